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
