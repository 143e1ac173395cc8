# Two commands on a fresh machine: `make install`, then `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-fast bench proto clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test]"
	touch $@

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) -m calibrator.bench

# Regenerate calibrator/caffe/caffe_pb2.py after editing caffe.proto (needs grpcio-tools).
proto:
	$(PY) -m grpc_tools.protoc -I calibrator/caffe --python_out=calibrator/caffe calibrator/caffe/caffe.proto

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
