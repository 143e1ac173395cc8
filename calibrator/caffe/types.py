"""Layer types the rest of the code treats specially, named once."""

#: Caffe layer types that produce data from outside the net (a data source feeds them).
DATA_LAYER_TYPES = frozenset({
    "Data", "ImageData", "AnnotatedData", "HDF5Data", "MemoryData", "WindowData",
    "DummyData", "VideoData",
})
#: Layers whose tops the graph does not compute: data layers and the deploy net's Input.
EXTERNAL_TYPES = DATA_LAYER_TYPES | {"Input"}
#: Layers that declare the shapes of their tops themselves.
SHAPED_TYPES = frozenset({"Input", "DummyData"})

#: Every layer type Intel Caffe 1.1.6 registers (``REGISTER_LAYER_CLASS`` /
#: ``REGISTER_LAYER_CREATOR`` in ``src/caffe/layers/*.cpp`` and ``layer_factory.cpp`` of
#: intel/caffe 44d53638): a prototxt with any other type does not run in Intel Caffe.
INTEL_CAFFE_LAYERS = frozenset("""
AbsVal Accuracy AnnotatedData ArgMax Axpy BNLL BatchNorm BatchReindex Bias BoxAnnotatorOHEM
BoxData Concat ContrastiveLoss Convolution Crop Data Deconvolution DetectionEvaluate
DetectionOutput Dropout DummyData ELU Eltwise Embed EuclideanLoss EvalDetection Exp Filter
Flatten HDF5Data HDF5Output HingeLoss Im2col ImageData InfogainLoss InnerProduct Input LRN
LSTM LSTMUnit Log MKLBatchNorm MVN MemoryData MnActivation MultiBoxLoss
MultinomialLogisticLoss Normalize PReLU PSROIPooling Parameter Permute Pooling Power PriorBox
Python RNN ROIPooling ReLU Reduction RegionLoss Reorg Reshape SPP Scale Sigmoid
SigmoidCrossEntropyLoss Silence Slice SmoothL1Loss SmoothL1LossOHEM Softmax SoftmaxWithLoss
SoftmaxWithLossOHEM SpatialDropout Split Swish TanH Threshold Tile VideoData WindowData
""".split())


def not_in_intel_caffe(net_param) -> dict[str, list[str]]:
    """Layer type -> names of the layers of ``net_param`` whose type Intel Caffe 1.1.6 does
    not have (ReLU6, Clip, ShuffleChannel, ConvolutionDepthwise...), in layer order."""
    found: dict[str, list[str]] = {}
    for layer in net_param.layer:
        if layer.type not in INTEL_CAFFE_LAYERS:
            found.setdefault(layer.type, []).append(layer.name)
    return found
