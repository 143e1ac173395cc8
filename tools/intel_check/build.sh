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
DIR=$(dirname "$OUT")
mkdir -p "$DIR"
FLAGS="-std=c++11 -O2 -pthread -fopenmp -fPIC -DCPU_ONLY -DUSE_LEVELDB -DUSE_LMDB
    -DMKLDNN_SUPPORTED -DUSE_MKLDNN_AS_DEFAULT_ENGINE -DCAFFE_VERSION=1.1.6 -DNDEBUG
    -DENABLE_SGD_FUSION -I$SRC/include -I$SRC/.build_release/src -I$MKLDNN/include
    -I/usr/include/hdf5/serial -I/usr/include/x86_64-linux-gnu"
LIBS="-L$SRC/.build_release/lib -L$MKLDNN/lib -L$MKLDNN/lib64 -Wl,-rpath,$SRC/.build_release/lib
    -Wl,-rpath,$MKLDNN/lib -Wl,-rpath,$MKLDNN/lib64 -lcaffe -lmkldnn -lglog -lgflags -lprotobuf
    -lboost_system -lboost_filesystem -lboost_thread -lopenblas -lm"
if ! [ -x "$OUT" ] || [ "$HERE/intel_dump.cpp" -nt "$OUT" ]; then
    g++ "$HERE/intel_dump.cpp" -o "$OUT" $FLAGS $LIBS
fi
# intel_transform: Intel's own DataTransformer with USE_OPENCV (the library is built without
# it), from the Intel tree's data_transformer.cpp; only when OpenCV's headers are installed.
# bbox_util.hpp includes highgui: a stand-in header gives it core/imgproc/imgcodecs instead.
TRANSFORM="$DIR/intel_transform"
if [ -d /usr/include/opencv4/opencv2 ] && { ! [ -x "$TRANSFORM" ] || \
        [ "$HERE/intel_transform.cpp" -nt "$TRANSFORM" ]; }; then
    mkdir -p "$DIR/stub/opencv2/highgui"
    printf '#include <opencv2/core/core.hpp>\n#include <opencv2/imgproc/imgproc.hpp>\n#include <opencv2/imgcodecs.hpp>\n' \
        > "$DIR/stub/opencv2/highgui/highgui.hpp"
    g++ "$HERE/intel_transform.cpp" "$SRC/src/caffe/data_transformer.cpp" -o "$TRANSFORM" \
        $FLAGS -DUSE_OPENCV -I"$DIR/stub" -I/usr/include/opencv4 $LIBS \
        -lopencv_core -lopencv_imgproc -lopencv_imgcodecs 2> "$DIR/intel_transform.log" || \
        echo "intel_transform not built (see $DIR/intel_transform.log)"
fi
