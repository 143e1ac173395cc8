#!/bin/sh
# Build intel_dump against an Intel Caffe 1.1.6 build, with the flags its own Makefile gives
# tools/caffe.bin (USE_OPENCV 0, CPU_ONLY, MKLDNN_SUPPORTED).
#   INTEL_CAFFE   the build root (default /work/intelcaffe): $INTEL_CAFFE/src is the Caffe tree
#                 with .build_release/lib/libcaffe.so, $INTEL_CAFFE/mkldnn-install MKL-DNN
#   OUT           where the binary goes (default build/intel_check/intel_dump)
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=${INTEL_CAFFE:-/work/intelcaffe}
SRC=$ROOT/src
MKLDNN=${MKLDNN_ROOT:-$ROOT/mkldnn-install}
OUT=${OUT:-build/intel_check/intel_dump}
mkdir -p "$(dirname "$OUT")"
if [ -x "$OUT" ] && [ "$OUT" -nt "$HERE/intel_dump.cpp" ]; then exit 0; fi
g++ "$HERE/intel_dump.cpp" -o "$OUT" -std=c++11 -O2 -pthread -fopenmp -fPIC \
    -DCPU_ONLY -DUSE_LEVELDB -DUSE_LMDB -DMKLDNN_SUPPORTED -DUSE_MKLDNN_AS_DEFAULT_ENGINE \
    -DCAFFE_VERSION=1.1.6 -DNDEBUG -DENABLE_SGD_FUSION \
    -I"$SRC/include" -I"$SRC/.build_release/src" -I"$MKLDNN/include" \
    -I/usr/include/hdf5/serial -I/usr/include/x86_64-linux-gnu \
    -L"$SRC/.build_release/lib" -L"$MKLDNN/lib" -L"$MKLDNN/lib64" \
    -Wl,-rpath,"$SRC/.build_release/lib" -Wl,-rpath,"$MKLDNN/lib" -Wl,-rpath,"$MKLDNN/lib64" \
    -lcaffe -lmkldnn -lglog -lgflags -lprotobuf -lboost_system -lboost_filesystem \
    -lboost_thread -lopenblas -lm
