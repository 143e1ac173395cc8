"""Caffe's DataTransformer for the TEST phase.

Per sample (once, cached as uint8): Caffe-SSD's ``resize_param`` warp if given, then the
center crop with offsets ``(H - crop) // 2``. Per batch (cheap, in torch):
``(pixel - mean) * scale`` in float32, the mean being per channel (``mean_value``) or a
mean image (``mean_file``) cut at the same crop offset, exactly as Caffe indexes it.

Intel Caffe's ``pad`` (TransformationParameter 19, written by ``first_conv_force_u8.py``),
as ``DataTransformer::Transform(const cv::Mat&, ...)`` computes it
(``src/caffe/data_transformer.cpp`` :1062-1124, only for decoded images, and measured with
Intel's own transformer by ``make intel-check``): the crop is a view into the image, and
``cv::copyMakeBorder(crop, crop, pad, ..., BORDER_CONSTANT, 0)`` on such a view takes the
border from the image around it where there is one (OpenCV extends a ROI into its parent),
zeros beyond. A pixel at row h, column w of the padded H x W result is then left *raw*
(0..255, not normalized) when ``h < pad or w < pad or h > H - pad or w > W - pad``, and is
``nearbyint((pixel - mean) * scale)`` otherwise (``pixel * scale`` without mean values): row
``H - pad`` and column ``W - pad``, padding too, are normalized (Intel's off-by-one).
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch

from calibrator.data.mean_file import load_mean_file
from calibrator.data.paths import looked_in, resolve_path
from calibrator.errors import CalibratorError, LayerError, shorten
from calibrator.limits import check_blob

log = logging.getLogger(__name__)

# Caffe-SSD ResizeParameter.Interp_mode -> OpenCV flag.
_INTERPOLATION = {1: cv2.INTER_LINEAR, 2: cv2.INTER_AREA, 3: cv2.INTER_NEAREST,
                  4: cv2.INTER_CUBIC, 5: cv2.INTER_LANCZOS4}
_WARP = 1  # ResizeParameter.Resize_mode.WARP

# Deprecated per-layer transformation fields of data_param/image_data_param.
_LEGACY_FIELDS = ("scale", "mean_file", "crop_size", "mirror")
# Random augmentations (Caffe-SSD noise, Intel Caffe random resizes): no exact TEST meaning.
_UNSUPPORTED = ("noise_param", "random_resize_param", "random_aspect_ratio_param")


class SampleError(ValueError):
    """A sample the transform cannot take; the source adds where the sample came from."""


def _has(message, field: str) -> bool:
    """HasField for a field this caffe.proto flavour may lack (crop_h, resize_param...)."""
    return field in message.DESCRIPTOR.fields_by_name and message.HasField(field)


class Transform:
    """One layer's preprocessing: ``prepare_*`` per decoded sample, ``normalize`` per batch."""

    def __init__(self, *, scale: float = 1.0, mean_values=(), mean_image: np.ndarray | None = None,
                 crop: tuple[int, int] = (0, 0), warp: tuple[int, int, int] | None = None,
                 force_color: bool = False, force_gray: bool = False, pad: int = 0):
        """``crop`` is (height, width), 0 for none; ``warp`` is (height, width, cv2 flag);
        ``pad`` is Intel Caffe's transform_param.pad (see the module docstring)."""
        self.scale = float(np.float32(scale))
        self.mean_values = np.asarray(mean_values, dtype=np.float32).ravel()
        self.mean_image = mean_image
        self.crop = tuple(int(c) for c in crop) if all(c > 0 for c in crop) else (0, 0)
        self.warp = warp
        self.force_color = force_color
        self.force_gray = force_gray
        self.pad = int(pad)
        if self.pad and mean_image is not None:
            raise SampleError("pad with a mean file is not supported (Intel Caffe indexes the "
                              "mean image without the pad offset)")
        self.mean_path: Path | None = None  # the mean file read, if any
        self._scale = torch.tensor(self.scale, dtype=torch.float32)
        self._mean = None
        if mean_image is not None:
            self._mean = torch.from_numpy(np.ascontiguousarray(self._crop(mean_image)))
        elif self.mean_values.size:
            self._mean = torch.from_numpy(self.mean_values).view(1, -1, 1, 1)

    @classmethod
    def from_layer(cls, layer, base_dir: Path) -> "Transform":
        """From a layer's ``transform_param``; a config Caffe refuses is a LayerError."""
        param = layer.transform_param

        def fail(message):
            return LayerError(layer.name, layer.type, f"transform_param: {message}")

        if param.force_color and param.force_gray:
            raise fail("cannot set both force_color and force_gray")
        if not np.isfinite(param.scale):
            raise fail(f"scale {param.scale} is not a finite number")
        if not np.isfinite(np.asarray(param.mean_value, np.float64)).all():
            raise fail("mean_value holds a value that is not a finite number")
        if param.HasField("mean_file") and len(param.mean_value):
            raise fail("cannot specify mean_file and mean_value at the same time")
        for field in _UNSUPPORTED:
            if _has(param, field):
                raise fail(f"{field} is not supported (random augmentation)")
        if param.mirror:
            log.warning("layer '%s': mirror is ignored (random mirroring has no place in "
                        "a deterministic evaluation)", layer.name)
        mean_image = None
        if param.HasField("mean_file"):
            try:
                path = resolve_path(param.mean_file, base_dir)
                if path is None:
                    raise CalibratorError(f"mean file {shorten(param.mean_file)} not found "
                                          f"({looked_in(param.mean_file, base_dir)})")
                mean_image = load_mean_file(path)
            except CalibratorError as exc:
                raise fail(str(exc)) from None
        # crop_size, else Caffe-SSD's crop_h/crop_w (both needed).
        crop = ((param.crop_size, param.crop_size) if param.crop_size
                else (getattr(param, "crop_h", 0), getattr(param, "crop_w", 0)))
        warp = None
        if _has(param, "resize_param"):
            warp = _warp_from(param.resize_param, fail)
        if getattr(param, "bgr2rgb", False):
            raise fail("bgr2rgb (Intel Caffe) is not supported")
        try:
            transform = cls(scale=param.scale, mean_values=list(param.mean_value),
                            mean_image=mean_image, crop=crop, warp=warp,
                            force_color=param.force_color, force_gray=param.force_gray,
                            pad=getattr(param, "pad", 0))
        except SampleError as exc:
            raise fail(f"mean file {shorten(param.mean_file)}: {exc}") from None
        transform.mean_path = path if mean_image is not None else None
        return transform

    def input_files(self) -> list[Path]:
        return [self.mean_path] if self.mean_path is not None else []

    # --- per sample --------------------------------------------------------------------
    def imdecode_flag(self) -> int:
        """How Caffe decodes an encoded Datum: forced color/gray, else as stored."""
        if self.force_color:
            return cv2.IMREAD_COLOR
        if self.force_gray:
            return cv2.IMREAD_GRAYSCALE
        return cv2.IMREAD_UNCHANGED

    def prepare_image(self, image: np.ndarray) -> np.ndarray:
        """An OpenCV image (HxW or HxWxC uint8) -> cropped CxHxW uint8, contiguous."""
        if image.dtype != np.uint8:
            raise SampleError(f"image data type must be unsigned byte, got {image.dtype}")
        if self.warp is not None:
            height, width, interpolation = self.warp
            image = cv2.resize(image, (width, height), interpolation=interpolation)
        chw = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
        if self.pad:
            self._check_and_crop(chw)  # the same checks
            return self._crop_with_border(chw)
        return self._check_and_crop(chw)

    def prepare_chw(self, chw: np.ndarray) -> np.ndarray:
        """A CxHxW sample of a raw Datum (uint8 or float32) -> cropped, contiguous."""
        if self.warp is not None:
            raise SampleError("resize_param is not supported for raw (not encoded) Datum")
        if self.pad:
            raise SampleError("transform_param.pad applies only to encoded images in Intel "
                              "Caffe (a raw Datum keeps its size: the first conv would lose "
                              "its padding)")
        return self._check_and_crop(chw)

    def _check_and_crop(self, chw: np.ndarray) -> np.ndarray:
        channels = chw.shape[0]
        if self.mean_values.size not in (0, 1, channels):
            raise SampleError(f"{self.mean_values.size} mean_value for {channels} channels "
                              "(give 1 or one per channel)")
        if self.mean_image is not None and chw.shape != self.mean_image.shape:
            raise SampleError(f"size {_shape(chw.shape)} differs from the mean file's "
                              f"{_shape(self.mean_image.shape)}")
        return np.ascontiguousarray(self._crop(chw))

    def _crop_with_border(self, chw: np.ndarray) -> np.ndarray:
        """The crop and ``pad`` pixels around it, from the image where it has them, 0 beyond
        (``cv::copyMakeBorder`` on a ROI, BORDER_CONSTANT 0)."""
        channels, height, width = chw.shape
        crop_h, crop_w = self.crop if self.crop[0] else (height, width)
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        pad = self.pad
        shape = (channels, crop_h + 2 * pad, crop_w + 2 * pad)
        check_blob(shape, f"transform_param.pad {pad}: a padded image", SampleError)
        out = np.zeros(shape, chw.dtype)
        rows = slice(max(top - pad, 0), min(top + crop_h + pad, height))
        cols = slice(max(left - pad, 0), min(left + crop_w + pad, width))
        out[:, rows.start - (top - pad):rows.stop - (top - pad),
            cols.start - (left - pad):cols.stop - (left - pad)] = chw[:, rows, cols]
        return out

    def _crop(self, chw: np.ndarray) -> np.ndarray:
        if not self.crop[0]:
            return chw
        crop_h, crop_w = self.crop
        _, height, width = chw.shape
        if height < crop_h or width < crop_w:
            raise SampleError(f"size {height}x{width} is smaller than the crop {crop_h}x{crop_w}")
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return chw[:, top:top + crop_h, left:left + crop_w]

    # --- per batch ---------------------------------------------------------------------
    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """NCHW uint8 (or float32) -> float32 ``(x - mean) * scale`` in Caffe's order."""
        x = raw = batch.to(torch.float32)
        # in place on the float copy (the same operations, without two more batch-sized
        # tensors); out of place where the batch was float32 already or the border keeps raw
        owned = x is not batch and not self.pad
        if self._mean is not None:
            x = x.sub_(self._mean) if owned else x - self._mean
        if self.scale != 1.0:
            x = x.mul_(self._scale) if owned else x * self._scale
        if self.pad:
            if self.mean_values.size:
                x = x.round_()                       # nearbyint, half to even
            height, width = x.shape[-2:]
            rows = torch.arange(height).view(-1, 1)
            cols = torch.arange(width).view(1, -1)
            border = ((rows < self.pad) | (cols < self.pad) | (rows > height - self.pad)
                      | (cols > width - self.pad))
            x = torch.where(border, raw, x)          # left raw there
        return x


def warn_legacy_fields(layer, param) -> None:
    """Caffe reads these only from V1 layers (upgraded into transform_param); say so."""
    for name in _LEGACY_FIELDS:
        if _has(param, name):
            log.warning("layer '%s': %s.%s is ignored, as Caffe ignores it in V2 layers; "
                        "move it to transform_param", layer.name, param.DESCRIPTOR.name, name)


def _warp_from(resize, fail) -> tuple[int, int, int]:
    """Caffe-SSD's ``resize_param``: only the deterministic form (WARP, <= 1 interp_mode)."""
    if resize.resize_mode != _WARP:
        raise fail("resize_param: only resize_mode WARP is supported")
    if len(resize.interp_mode) > 1:
        raise fail("resize_param: several interp_mode pick one at random; give one")
    if resize.height < 1 or resize.width < 1:
        raise fail("resize_param: height and width must be set")
    check_blob((4, resize.height, resize.width), "resize_param: a resized image", fail)
    mode = resize.interp_mode[0] if len(resize.interp_mode) else 1
    return resize.height, resize.width, _INTERPOLATION[mode]


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape)
