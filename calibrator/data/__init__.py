"""TEST-phase data layers (ImageData, Data/LMDB) and image folders as batch sources."""

from calibrator.data import annotated as _annotated  # noqa: F401  (registers AnnotatedData)
from calibrator.data import image_data as _image_data  # noqa: F401  (registers ImageData)
from calibrator.data import lmdb_data as _lmdb_data  # noqa: F401  (registers Data)
from calibrator.data.feed import batches
from calibrator.data.image_folder import ImageFolderSource, build_image_folder_source
from calibrator.data.options import DetectionListOptions, ImageFolderOptions
from calibrator.data.sources import DATA_LAYER_TYPES, DataSource, build_data_source, is_data_layer
from calibrator.data.transform import Transform

__all__ = [
    "DATA_LAYER_TYPES", "DataSource", "batches", "DetectionListOptions", "ImageFolderOptions",
    "ImageFolderSource", "Transform",
    "build_data_source", "build_image_folder_source", "is_data_layer",
]
