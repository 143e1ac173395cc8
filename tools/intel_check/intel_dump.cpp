// intel_dump: run a net through real Intel Caffe (MKL-DNN engine; INT8 where the prototxt
// carries quantization_param) on inputs given as .npy files, and dump every top.
//
//   intel_dump MODEL WEIGHTS OUTDIR BLOB=FILE.npy [BLOB=FILE.npy ...]
//
// Each BLOB (an Input top) is reshaped to the array's shape and filled with it (float32,
// C order). The net then runs layer by layer (ForwardFromTo(i, i)) and every top is written
// right after the layer that wrote it, as OUTDIR/<top>.npy ('/' becomes '_'): a conv with a
// fused sum writes into its residual's memory (top[0]->ShareData(*bottom[1])), so a final
// Forward() would show shared blobs with their last writer's values. The values are what
// Caffe's cpu_data() gives: an INT8 memory is read back as f32(q) * f32(1 / scale).
// OUTDIR/blobs.tsv lists per top: layer index, layer, type, top, shape, the data type of the
// blob's MKL-DNN private memory (u8/s8/s32/f32, "cpu" without one) and its scale;
// OUTDIR/compiled_net.prototxt is the net after Intel's CompileNet (the fusions it made).
//
// Built by build.sh against an Intel Caffe build (INTEL_CAFFE, default /work/intelcaffe).
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <sstream>
#include <string>
#include <unistd.h>
#include <vector>

#include "caffe/caffe.hpp"
#ifdef MKLDNN_SUPPORTED
#include "caffe/mkldnn_memory.hpp"
#endif

using namespace caffe;

static bool read_npy(const std::string& path, std::vector<int>* shape, std::vector<float>* data) {
  std::ifstream f(path.c_str(), std::ios::binary);
  if (!f) return false;
  char magic[6];
  f.read(magic, 6);
  if (std::string(magic + 1, 5) != "NUMPY") return false;
  unsigned char version[2];
  f.read(reinterpret_cast<char*>(version), 2);
  unsigned int header_len = 0;
  if (version[0] == 1) {
    unsigned char b[2];
    f.read(reinterpret_cast<char*>(b), 2);
    header_len = b[0] | (b[1] << 8);
  } else {
    unsigned char b[4];
    f.read(reinterpret_cast<char*>(b), 4);
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (b[3] << 24);
  }
  std::string header(header_len, ' ');
  f.read(&header[0], header_len);
  if (header.find("'<f4'") == std::string::npos ||
      header.find("'fortran_order': False") == std::string::npos) return false;
  size_t open = header.find('(', header.find("'shape'"));
  size_t close = header.find(')', open);
  std::stringstream dims(header.substr(open + 1, close - open - 1));
  std::string item;
  size_t count = 1;
  while (std::getline(dims, item, ',')) {
    if (item.find_first_not_of(" ") == std::string::npos) continue;
    shape->push_back(atoi(item.c_str()));
    count *= shape->back();
  }
  data->resize(count);
  f.read(reinterpret_cast<char*>(data->data()), count * sizeof(float));
  return static_cast<size_t>(f.gcount()) == count * sizeof(float);
}

static void write_npy(const std::string& path, const float* data, const std::vector<int>& shape) {
  std::ostringstream hdr;
  hdr << "{'descr': '<f4', 'fortran_order': False, 'shape': (";
  for (size_t i = 0; i < shape.size(); ++i)
    hdr << shape[i] << (shape.size() == 1 || i + 1 < shape.size() ? "," : "");
  hdr << "), }";
  std::string h = hdr.str();
  size_t pad = (64 - (10 + h.size() + 1) % 64) % 64;
  h += std::string(pad, ' ') + "\n";
  std::ofstream f(path.c_str(), std::ios::binary);
  f.write("\x93NUMPY\x01\x00", 8);
  unsigned short len = static_cast<unsigned short>(h.size());
  f.write(reinterpret_cast<const char*>(&len), 2);
  f.write(h.data(), h.size());
  size_t n = 1;
  for (size_t i = 0; i < shape.size(); ++i) n *= shape[i];
  f.write(reinterpret_cast<const char*>(data), n * sizeof(float));
}

static std::string memory_info(Blob<float>* blob) {
#ifdef MKLDNN_SUPPORTED
  if (blob->prv_data() == NULL) return "cpu\t1";
  boost::shared_ptr<PrvMemDescr> d = blob->get_prv_data_descriptor();
  if (!d || d->get_descr_type() != PrvMemDescr::PRV_DESCR_MKLDNN) return "prv\t1";
  boost::shared_ptr<MKLDNNMemoryDescriptor<float, false> > m =
      get_mkldnn_prv_descriptor<float, false>(blob);
  std::ostringstream s;
  switch (m->prv_memory_pd()->desc().data.data_type) {
    case mkldnn::memory::data_type::f32: s << "f32"; break;
    case mkldnn::memory::data_type::s32: s << "s32"; break;
    case mkldnn::memory::data_type::s8: s << "s8"; break;
    case mkldnn::memory::data_type::u8: s << "u8"; break;
    default: s << "other";
  }
  std::vector<float> scale = m->get_scale();
  s << "\t";
  for (size_t i = 0; i < scale.size(); ++i) s << (i ? "," : "") << std::setprecision(9) << scale[i];
  return s.str();
#else
  return "cpu\t1";
#endif
}

static std::string file_name(const std::string& name) {
  std::string s = name;
  for (size_t i = 0; i < s.size(); ++i) if (s[i] == '/') s[i] = '_';
  return s;
}

int main(int argc, char** argv) {
  ::google::InitGoogleLogging(argv[0]);
  if (argc < 5) {
    fprintf(stderr, "usage: %s MODEL WEIGHTS OUTDIR BLOB=FILE.npy [...]\n", argv[0]);
    return 2;
  }
  const std::string model = argv[1], weights = argv[2], out = argv[3];
  Caffe::set_mode(Caffe::CPU);
  Net<float> net(model, caffe::TEST, 0, NULL, NULL, "MKLDNN");
  net.CopyTrainedLayersFrom(weights);
  for (int i = 4; i < argc; ++i) {
    std::string arg = argv[i];
    size_t eq = arg.find('=');
    std::vector<int> shape;
    std::vector<float> data;
    if (eq == std::string::npos || !read_npy(arg.substr(eq + 1), &shape, &data)) {
      fprintf(stderr, "cannot read %s (BLOB=FILE.npy, float32, C order)\n", arg.c_str());
      return 2;
    }
    const std::string name = arg.substr(0, eq);
    if (!net.has_blob(name)) {
      fprintf(stderr, "the net has no blob %s\n", name.c_str());
      return 2;
    }
    boost::shared_ptr<Blob<float> > blob = net.blob_by_name(name);
    blob->Reshape(shape);
    std::copy(data.begin(), data.end(), blob->mutable_cpu_data());
  }
  net.Reshape();
  const std::vector<boost::shared_ptr<Layer<float> > >& layers = net.layers();
  const std::vector<std::vector<Blob<float>*> >& tops = net.top_vecs();
  {
    std::ofstream f((out + "/compiled_net.prototxt").c_str());
    for (size_t i = 0; i < layers.size(); ++i)
      f << "layer {\n" << layers[i]->layer_param().DebugString() << "}\n";
  }
  std::ofstream tsv((out + "/blobs.tsv").c_str());
  tsv << "layer_index\tlayer\ttype\ttop\tshape\tdtype\tscale\n";
  for (size_t i = 0; i < layers.size(); ++i) {
    const LayerParameter& param = layers[i]->layer_param();
    if (param.type() != "Input") net.ForwardFromTo(i, i);
    for (size_t t = 0; t < tops[i].size(); ++t) {
      Blob<float>* blob = tops[i][t];
      std::string info = memory_info(blob);
      write_npy(out + "/" + file_name(param.top(t)) + ".npy", blob->cpu_data(), blob->shape());
      tsv << i << "\t" << param.name() << "\t" << param.type() << "\t" << param.top(t) << "\t"
          << blob->shape_string() << "\t" << info << "\n";
    }
  }
  tsv.close();
  // Every file is written: leave without running Caffe's destructors (after a conv whose
  // fused sum had an FP32 residual, MKL-DNN 0.18 in Intel Caffe 1.1.6 crashes in them).
  fflush(stdout);
  fflush(stderr);
  _exit(0);
}
