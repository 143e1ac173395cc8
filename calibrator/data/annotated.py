"""Caffe-SSD's AnnotatedData layer in the TEST phase: images and their boxes.

Tops: ``data`` ``(N, C, H, W)`` as the other sources make it (``transform_param``: Caffe-SSD
``resize_param`` WARP, centre crop, mean, scale), and optionally ``label`` ``(1, 1, G, 8)``:
one row ``[item_id, group_label, instance_id, xmin, ymin, xmax, ymax, difficult]`` per box of
the batch (item_id = position in the batch; boxes normalised to the network input), or a
single row of -1 when the batch has no box, as ``AnnotatedDataLayer::load_batch`` fills it.

Boxes go through ``DataTransformer::TransformAnnotation``: the resize policy's update (WARP:
scaled to the new size and back, bounded by the image), the ``emit_constraint`` if any, then
the projection onto the crop window, which clips them to [0, 1] and drops boxes left
without area. Random parts are refused (``distort_param``, ``expand_param``, a
``batch_sampler`` that is not the identity; an empty ``batch_sampler {}`` as in the usual
test prototxts samples the whole image, i.e. does nothing).

Two sources, chosen by ``data_param.source``:

* **an LMDB of AnnotatedDatum** (``create_annoset`` or ``calibrator make-annoset``): a folder
  (or LMDB file), read in key order like the Data layer; ``backend: LMDB`` is required.
* **a list file** for users without an LMDB: ``source`` names a *text file* (``.txt``) with
  ``IMAGE XML`` lines as ``create_annoset`` takes them (Pascal VOC XML), and
  ``annotated_data_param.label_map_file`` maps the XML ``<name>`` to labels. Paths in the list
  are relative to the list file's folder, or to ``image_data_param.root_folder`` when that is
  set (prepended as a string, as Caffe's ImageData does). Each line becomes exactly the
  AnnotatedDatum ``make-annoset`` would store (original image bytes, boxes divided by the
  XML size), so both sources give identical batches. Example::

      layer {
        name: "data" type: "AnnotatedData" top: "data" top: "label"
        transform_param {
          mean_value: 104 mean_value: 177 mean_value: 123
          resize_param { resize_mode: WARP height: 300 width: 300 interp_mode: LINEAR }
        }
        data_param { source: "faces/list.txt" batch_size: 1 }
        annotated_data_param { label_map_file: "faces/labelmap.prototxt" }
      }

  Real Caffe cannot read such a layer (it wants an LMDB); ``calibrator make-annoset`` turns
  the same list into one.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from google.protobuf.message import DecodeError

from calibrator.caffe import caffe_pb2
from calibrator.data.lmdb_data import _LMDB, LmdbDataSource
from calibrator.data.paths import looked_in, resolve_path
from calibrator.data.sources import DataSource, register
from calibrator.data.transform import Transform, _has, warn_legacy_fields
from calibrator.detection.annoset import load_label_map, make_annotated_datum, read_annoset_list
from calibrator.detection.matching import caffe_box_size, project_boxes
from calibrator.errors import CalibratorError, LayerError

F32 = np.float32
_BBOX = 0  # AnnotatedDatum.AnnotationType.BBOX
_CENTER, _MIN_OVERLAP = 0, 1  # EmitConstraint.EmitType


# --- annotation transform (TEST) -------------------------------------------------------------

def _warp_update(box: np.ndarray, old_h: int, old_w: int, new_h: int, new_w: int) -> np.ndarray:
    """``UpdateBBoxByResizePolicy`` for WARP, in float32 as Caffe computes it."""
    nw, nh = F32(new_w), F32(new_h)
    x0, y0 = box[0] * F32(old_w), box[1] * F32(old_h)
    x1, y1 = box[2] * F32(old_w), box[3] * F32(old_h)
    x0 = max(F32(0), x0 * nw / F32(old_w))
    x1 = min(nw, x1 * nw / F32(old_w))
    y0 = max(F32(0), y0 * nh / F32(old_h))
    y1 = min(nh, y1 * nh / F32(old_h))
    return np.array([x0 / nw, y0 / nh, x1 / nw, y1 / nh], F32)


def _meets_emit(crop: np.ndarray, box: np.ndarray, emit_type: int, emit_overlap: float) -> bool:
    """``MeetEmitConstraint`` of a box with the crop window."""
    if emit_type == _CENTER:
        cx = (box[0] + box[2]) / F32(2)
        cy = (box[1] + box[3]) / F32(2)
        return bool(crop[0] <= cx <= crop[2] and crop[1] <= cy <= crop[3])
    # MIN_OVERLAP: the share of the box inside the window
    if crop[0] > box[2] or crop[2] < box[0] or crop[1] > box[3] or crop[3] < box[1]:
        return False
    inter = np.array([max(box[0], crop[0]), max(box[1], crop[1]),
                      min(box[2], crop[2]), min(box[3], crop[3])], F32)
    inter_size = caffe_box_size(inter)
    if inter_size <= 0:
        return False
    return bool(inter_size / caffe_box_size(box) > F32(emit_overlap))


class AnnotationTransform:
    """The box side of the layer's transform: resize update, emit constraint, crop."""

    def __init__(self, transform: Transform, emit_constraint=None):
        self.transform = transform
        self.warp = transform.warp  # (height, width, flag) or None
        self.emit = None
        if emit_constraint is not None:
            self.emit = (int(emit_constraint.emit_type), float(emit_constraint.emit_overlap))

    def crop_window(self, height: int, width: int) -> np.ndarray:
        """The crop in normalised coordinates of the (resized) image Caffe crops."""
        if self.warp is not None:
            height, width = self.warp[0], self.warp[1]
        crop_h, crop_w = self.transform.crop
        if not crop_h:
            return np.array([0, 0, 1, 1], F32)
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return np.array([F32(left) / F32(width), F32(top) / F32(height),
                         F32(left + crop_w) / F32(width), F32(top + crop_h) / F32(height)], F32)

    def __call__(self, anno_datum, height: int, width: int) -> np.ndarray:
        """Rows ``[group_label, instance_id, xmin, ymin, xmax, ymax, difficult]`` (float32)
        of an AnnotatedDatum whose image is ``height x width`` before any resize."""
        crop = self.crop_window(height, width)
        rows = []
        for group in anno_datum.annotation_group:
            for anno in group.annotation:
                b = anno.bbox
                box = np.array([b.xmin, b.ymin, b.xmax, b.ymax], F32)
                if self.warp is not None:
                    box = _warp_update(box, height, width, self.warp[0], self.warp[1])
                if self.emit is not None and not _meets_emit(crop, box, *self.emit):
                    continue
                projected, valid = project_boxes(crop, box)
                if not valid[0]:
                    continue
                rows.append([group.group_label, anno.instance_id, *projected[0].tolist(),
                             float(b.difficult)])
        return np.asarray(rows, F32).reshape(-1, 7)


def _check_layer(layer, fail) -> None:
    """What the TEST phase cannot reproduce or does not support."""
    tp = layer.transform_param
    for name in ("distort_param", "expand_param"):
        if _has(tp, name):
            raise fail(f"transform_param.{name} is a random augmentation; remove it for "
                       "evaluation")
    if _has(tp, "resize_param") and tp.resize_param.resize_mode != 1:
        raise fail("transform_param.resize_param: only resize_mode WARP is supported")
    ap = layer.annotated_data_param
    if ap.HasField("anno_type") and ap.anno_type != _BBOX:
        raise fail("only anno_type BBOX is supported")
    for sampler in ap.batch_sampler:
        s = sampler.sampler
        identity = (sampler.use_original_image and s.min_scale == 1 and s.max_scale == 1
                    and s.min_aspect_ratio == 1 and s.max_aspect_ratio == 1
                    and not sampler.HasField("sample_constraint"))
        if not identity:
            raise fail("annotated_data_param.batch_sampler samples random crops; only the "
                       "empty 'batch_sampler {}' (the whole image) is supported")


class _AnnotatedBatches:
    """Label blob assembly shared by both annotated sources (a DataSource mixin)."""

    _annotations: dict
    _boxes: AnnotationTransform

    def _label(self, sample: int) -> float:  # DataSource.batch asks; the blob is built below
        return 0.0

    def top_shapes(self) -> dict[str, tuple]:
        shapes = DataSource.top_shapes(self)
        if len(self.tops) > 1:
            shapes[self.tops[1]] = (1, 1, 1, 8)
        return shapes

    def boxes(self, sample: int) -> np.ndarray:
        """The transformed boxes of one sample: rows of 7 (label blob rows without item_id)."""
        if sample not in self._annotations:
            self._images([sample])
        return self._annotations[sample]

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        out = DataSource.batch(self, index)
        if len(self.tops) > 1:
            start = index * self.batch_size
            samples = [self._sample_at(p) for p in range(start, start + self.batch_size)]
            parts = []
            for item, sample in enumerate(samples):
                rows = self.boxes(sample)
                if len(rows):
                    parts.append(np.concatenate(
                        [np.full((len(rows), 1), item, F32), rows], axis=1))
            label = (np.concatenate(parts) if parts else np.full((1, 8), -1, F32))
            out[self.tops[1]] = torch.from_numpy(label.reshape(1, 1, -1, 8))
        return out

    def _decode_annotated(self, sample: int, anno_datum) -> np.ndarray:
        """Image (transformed, CHW) of an AnnotatedDatum; its boxes go to _annotations."""
        datum = anno_datum.datum
        if anno_datum.type != _BBOX:
            raise self.error(f"{self._describe(sample)}: annotation type {anno_datum.type} "
                             "is not BBOX")
        if datum.encoded:
            image = cv2.imdecode(np.frombuffer(datum.data, np.uint8),
                                 self.transform.imdecode_flag())
            if image is None:
                raise self.error(f"{self._describe(sample)}: cannot decode the encoded image")
            height, width = image.shape[:2]
            chw = self._prepared(sample, self.transform.prepare_image, image)
        else:
            shape = (datum.channels, datum.height, datum.width)
            values = (np.frombuffer(datum.data, np.uint8) if datum.data
                      else np.array(datum.float_data, dtype=F32))
            if min(shape) < 1 or values.size != int(np.prod(shape)):
                raise self.error(f"{self._describe(sample)}: Datum holds {values.size} values "
                                 f"for channels x height x width = {'x'.join(map(str, shape))}")
            height, width = shape[1:]
            chw = self._prepared(sample, self.transform.prepare_chw, values.reshape(shape))
        # Caffe updates boxes with the size stored in the Datum (the decoded one if unset)
        if datum.height > 0 and datum.width > 0:
            height, width = datum.height, datum.width
        self._annotations[sample] = self._boxes(anno_datum, height, width)
        return chw


def _annotation_transform(layer, transform: Transform) -> AnnotationTransform:
    tp = layer.transform_param
    return AnnotationTransform(transform,
                               emit_constraint=tp.emit_constraint if _has(tp, "emit_constraint")
                               else None)


@register("AnnotatedData")
class AnnotatedLmdbSource(_AnnotatedBatches, LmdbDataSource):
    """AnnotatedData over an LMDB of AnnotatedDatum (key order, wrapping)."""

    def __init__(self, path: Path, *, tops, batch_size: int, transform: Transform,
                 boxes: AnnotationTransform, cache: bool = True, layer=None):
        super().__init__(path, tops=tops, batch_size=batch_size, transform=transform,
                         cache=cache, layer=layer)
        self._boxes = boxes
        self._annotations: dict[int, np.ndarray] = {}

    @classmethod
    def from_layer(cls, layer, base_dir: Path, *, cache: bool = True) -> DataSource:
        param = layer.data_param

        def fail(message):
            return LayerError(layer.name, layer.type, message)

        if len(layer.top) not in (1, 2):
            raise fail(f"needs 1 or 2 tops (data[, label]), has {len(layer.top)}")
        if param.batch_size < 1:
            raise fail("data_param.batch_size must be at least 1")
        if not param.source:
            raise fail("data_param.source is not set")
        _check_layer(layer, fail)
        path = resolve_path(param.source, base_dir)
        if path is None:
            raise fail(f"{param.source} not found ({looked_in(param.source, base_dir)})")
        transform = Transform.from_layer(layer, base_dir)
        boxes = _annotation_transform(layer, transform)
        warn_legacy_fields(layer, param)
        if path.is_file() and path.suffix.lower() == ".txt":
            return AnnotatedListSource.from_list(layer, path, base_dir, transform, boxes,
                                                 cache=cache)
        if param.backend != _LMDB:
            raise fail("only backend: LMDB is supported for a database (or give a .txt list "
                       "of 'IMAGE XML' lines as source)")
        return cls(path, tops=list(layer.top), batch_size=param.batch_size, transform=transform,
                   boxes=boxes, cache=cache, layer=(layer.name, layer.type))

    def _read(self, sample: int):
        with self._env.begin() as txn:
            raw = txn.get(self._keys[sample])
        anno_datum = caffe_pb2.AnnotatedDatum()
        try:
            anno_datum.ParseFromString(raw)
        except DecodeError:
            raise self.error(f"{self._describe(sample)}: value is not a serialized "
                             "AnnotatedDatum") from None
        if not anno_datum.HasField("datum"):
            raise self.error(f"{self._describe(sample)}: value is not an AnnotatedDatum "
                             "(no datum; a plain Data LMDB?)")
        return anno_datum

    def _decode(self, sample: int, anno_datum) -> np.ndarray:
        return self._decode_annotated(sample, anno_datum)


class AnnotatedListSource(_AnnotatedBatches, DataSource):
    """AnnotatedData over a ``create_annoset`` list of ``IMAGE XML`` lines + a label map."""

    def __init__(self, entries, list_path: Path, root: str, base_dir: Path,
                 name_to_label: dict[str, int], *, tops, batch_size: int,
                 transform: Transform, boxes: AnnotationTransform, cache: bool = True,
                 layer=None):
        super().__init__(tops, batch_size, transform, cache=cache, layer=layer)
        self._entries = entries
        self._list_path = list_path
        self._root = root  # "" -> the list's folder
        self._base_dir = base_dir
        self._name_to_label = name_to_label
        self._boxes = boxes
        self._annotations: dict[int, np.ndarray] = {}

    @classmethod
    def from_list(cls, layer, list_path: Path, base_dir: Path, transform: Transform,
                  boxes: AnnotationTransform, *, cache: bool = True) -> "AnnotatedListSource":
        def fail(message):
            return LayerError(layer.name, layer.type, message)

        label_map = layer.annotated_data_param.label_map_file
        if not label_map:
            raise fail("a list source needs annotated_data_param.label_map_file")
        label_map_path = resolve_path(label_map, base_dir)
        if label_map_path is None:
            raise fail(f"label map {label_map} not found ({looked_in(label_map, base_dir)})")
        try:
            entries = read_annoset_list(list_path)
            name_to_label = load_label_map(label_map_path)
        except CalibratorError as exc:
            raise fail(str(exc)) from None
        root = layer.image_data_param.root_folder if layer.HasField("image_data_param") else ""
        source = cls(entries, list_path, root, base_dir, name_to_label, tops=list(layer.top),
                     batch_size=layer.data_param.batch_size, transform=transform, boxes=boxes,
                     cache=cache, layer=(layer.name, layer.type))
        source.label_map_path = label_map_path
        return source

    def input_files(self) -> list[Path]:
        """The list, the label map, and each image and XML it names (where it may be)."""
        files = [self._list_path, getattr(self, "label_map_path", None)]
        for image, xml, _ in self._entries:
            for name in (image, xml):
                if self._root:
                    joined = Path(self._root + name)
                    files += [joined] if joined.is_absolute() else \
                        [Path(self._base_dir) / joined, Path.cwd() / joined]
                else:
                    files += [self._list_path.parent / name, Path(self._base_dir) / name,
                              Path.cwd() / name]
        return files + self.transform.input_files()

    def num_samples(self) -> int:
        return len(self._entries)

    def _describe(self, sample: int) -> str:
        image, _, number = self._entries[sample]
        return f"{self._list_path}:{number} ({image})"

    def _path(self, sample: int, name: str) -> Path:
        if not self._root:
            path = self._list_path.parent / name
            if path.exists():
                return path
            found = resolve_path(name, self._base_dir)
            if found is None:
                raise self.error(f"{self._describe(sample)}: {name} not found (looked in "
                                 f"{path}, {Path(self._base_dir) / name} and "
                                 f"{Path.cwd() / name}; set image_data_param.root_folder "
                                 "if the list's paths start elsewhere)")
            return found
        joined = self._root + name  # Caffe concatenates root_folder and the name
        found = resolve_path(joined, self._base_dir)
        if found is None:
            raise self.error(f"{self._describe(sample)}: {joined} not found "
                             f"({looked_in(joined, self._base_dir)})")
        return found

    def _decode(self, sample: int, raw) -> np.ndarray:
        image, xml, _ = self._entries[sample]
        try:
            anno_datum = make_annotated_datum(self._path(sample, image), self._path(sample, xml),
                                              self._name_to_label)
        except LayerError:
            raise
        except CalibratorError as exc:
            raise self.error(f"{self._describe(sample)}: {exc}") from None
        return self._decode_annotated(sample, anno_datum)
