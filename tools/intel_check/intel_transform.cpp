// intel_transform: Intel Caffe's own DataTransformer (src/caffe/data_transformer.cpp of the
// Intel tree, compiled here with USE_OPENCV, which the library build lacks) on one image, as
// its ImageData layer runs it in the TEST phase (cv::imread in color, then
// Transform(cv::Mat, Blob*): crop, Intel's transform_param.pad, mean, scale).
//
//   intel_transform PROTOTXT LAYER IMAGE OUT.npy
//
// Built by build.sh (when OpenCV's headers are installed) from this file and the Intel
// tree's data_transformer.cpp; the rest comes from libcaffe.
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <opencv2/core/core.hpp>
#include <opencv2/imgcodecs.hpp>

#include "caffe/blob.hpp"
#include "caffe/data_transformer.hpp"
#include "caffe/util/io.hpp"
#include "caffe/util/upgrade_proto.hpp"

#include "caffe/util/im_transforms.hpp"

using namespace caffe;

// The library was built without OpenCV, so these (declared by Intel's headers, defined in
// its io.cpp and im_transforms.cpp) are missing; the TEST path measured here (crop, pad,
// mean, scale) never calls them: any call stops the tool.
namespace caffe {
static cv::Mat not_built(const char* what) {
  LOG(FATAL) << what << " is not part of intel_transform";
  return cv::Mat();
}
cv::Mat ApplyResize(const cv::Mat&, const ResizeParameter&) { return not_built("resize"); }
cv::Mat ApplyNoise(const cv::Mat&, const NoiseParameter&) { return not_built("noise"); }
cv::Mat ApplyDistort(const cv::Mat&, const DistortionParameter&) { return not_built("distort"); }
cv::Mat DecodeDatumToCVMatNative(const Datum&) { return not_built("Datum decoding"); }
cv::Mat DecodeDatumToCVMat(const Datum&, bool) { return not_built("Datum decoding"); }
void EncodeCVMatToDatum(const cv::Mat&, const string&, Datum*) { not_built("Datum encoding"); }
void CVMatToDatum(const cv::Mat&, Datum*) { not_built("Datum encoding"); }
}  // namespace caffe

static void write_npy(const std::string& path, const float* data, const std::vector<int>& shape) {
  std::string h = "{'descr': '<f4', 'fortran_order': False, 'shape': (";
  size_t n = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    h += std::to_string(shape[i]) + ",";
    n *= shape[i];
  }
  h += "), }";
  h += std::string((64 - (10 + h.size() + 1) % 64) % 64, ' ') + "\n";
  std::ofstream f(path.c_str(), std::ios::binary);
  f.write("\x93NUMPY\x01\x00", 8);
  unsigned short len = static_cast<unsigned short>(h.size());
  f.write(reinterpret_cast<const char*>(&len), 2);
  f.write(h.data(), h.size());
  f.write(reinterpret_cast<const char*>(data), n * sizeof(float));
}

int main(int argc, char** argv) {
  ::google::InitGoogleLogging(argv[0]);
  if (argc != 5) {
    fprintf(stderr, "usage: %s PROTOTXT LAYER IMAGE OUT.npy\n", argv[0]);
    return 2;
  }
  NetParameter net;
  ReadNetParamsFromTextFileOrDie(argv[1], &net);
  const LayerParameter* layer = NULL;
  for (int i = 0; i < net.layer_size(); ++i)
    if (net.layer(i).name() == argv[2]) layer = &net.layer(i);
  if (layer == NULL) {
    fprintf(stderr, "no layer %s\n", argv[2]);
    return 2;
  }
  cv::Mat image = cv::imread(argv[3], cv::IMREAD_COLOR);
  if (image.empty()) {
    fprintf(stderr, "cannot read %s\n", argv[3]);
    return 2;
  }
  DataTransformer<float> transformer(layer->transform_param(), TEST);
  transformer.InitRand();
  Blob<float> blob(transformer.InferBlobShape(image));
  transformer.Transform(image, &blob);
  write_npy(argv[4], blob.cpu_data(), blob.shape());
  return 0;
}
