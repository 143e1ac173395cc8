"""Caffe-SSD's ``create_annoset`` in Python: an image list with Pascal VOC XML files and a
label map -> an LMDB of ``AnnotatedDatum`` that Caffe-SSD's AnnotatedData layer reads.

The list has one ``IMAGE LABEL_FILE`` pair per line (whitespace separated, as
``create_annoset`` reads it), both relative to a root folder. Each XML ``<object>`` becomes a
box of the ``AnnotationGroup`` of its label (``<name>`` looked up among the label map's item
names), with a per-group ``instance_id``; ``<bndbox>`` integer pixels are divided by the
``<size>`` width and height (no +1: dividing gives back normalised boxes), ``<difficult>1``
is kept. As in Caffe's ``ReadXMLToAnnotatedDatum``, children of an ``<object>`` are read in
order, so ``<difficult>`` only applies to a ``<bndbox>`` that follows it (VOC files put it
first), and ``<size>`` falls back to the image's own size when missing.

Differences from Caffe, all on input Caffe mishandles: a missing XML file is an error (Caffe
silently stores the image without boxes), and so is a non-integer box coordinate (Caffe
stores 0).

Records: key ``%08d_<IMAGE as listed>``, value an ``AnnotatedDatum`` (type BBOX) whose
``datum`` holds the image file's original bytes (``encoded: true``, label -1, channels,
height and width of the decoded image); with a resize, or an ``encode_type`` other than the
file's own, the image is decoded, resized (bilinear) and re-encoded.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import lmdb
import numpy as np

from calibrator.caffe import caffe_pb2
from calibrator.caffe.prototxt import read_label_map
from calibrator.errors import CalibratorError, shorten
from calibrator.fileio import read_bytes

log = logging.getLogger(__name__)

F32 = np.float32


# --- inputs -------------------------------------------------------------------------------

def load_label_map(path: str | os.PathLike) -> dict[str, int]:
    """Caffe-SSD ``MapNameToLabel`` (strict): item name -> label; a name given twice is an
    error."""
    label_map = read_label_map(path)
    names: dict[str, int] = {}
    for item in label_map.item:
        if item.name in names:
            raise CalibratorError(f"label map {path}: name {item.name!r} appears twice")
        names[item.name] = int(item.label)
    if not names:
        raise CalibratorError(f"label map {path}: no item")
    return names


def num_classes_of(path: str | os.PathLike) -> int:
    """The number of classes a label map describes: its largest label + 1."""
    return max(load_label_map(path).values()) + 1


def read_annoset_list(path: str | os.PathLike) -> list[tuple[str, str, int]]:
    """(image, label file, line number) per non-blank line of a ``create_annoset`` list."""
    text = read_bytes(path, "list file").decode("utf-8", errors="surrogateescape")
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise CalibratorError(f"{shorten(path)}:{number}: expected 'IMAGE LABEL_FILE' "
                                  f"(paths without spaces), got '{shorten(line.strip())}'")
        entries.append((parts[0], parts[1], number))
    if not entries:
        raise CalibratorError(f"list file {path} is empty")
    return entries


def _xml_int(element, tag: str, where: str) -> int:
    node = element.find(tag)
    if node is None or node.text is None or not node.text.strip():
        return 0  # boost's pt.get(tag, 0)
    try:
        return int(node.text.strip())
    except ValueError:
        raise CalibratorError(f"{where}: <{tag}> is {node.text.strip()!r}, not an integer "
                              "pixel (create_annoset would store 0)") from None


def read_voc_xml(path: str | os.PathLike, name_to_label: dict[str, int], image_height: int,
                 image_width: int, anno_datum) -> None:
    """``ReadXMLToAnnotatedDatum``: append the XML's boxes to ``anno_datum.annotation_group``
    (normalised by the XML's ``<size>``, else the image's size)."""
    path = Path(path)
    raw = read_bytes(path, "annotation")
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as exc:
        raise CalibratorError(f"{shorten(path)}: not a valid XML file ({exc})") from None
    except RecursionError:
        raise CalibratorError(f"{shorten(path)}: XML nested too deeply") from None
    height, width = image_height, image_width
    size = root.find("size")
    try:
        height = int(size.find("height").text.strip())
        width = int(size.find("width").text.strip())
    except (AttributeError, ValueError):
        log.warning("%s: no valid <size>; using the image's own %dx%d", path, image_width,
                    image_height)
    if (height, width) != (image_height, image_width):
        log.warning("%s: <size> %dx%d differs from the image's %dx%d", path, width, height,
                    image_width, image_height)
    if width == 0 or height == 0:
        raise CalibratorError(f"{path}: no valid image width/height")
    groups = {g.group_label: g for g in anno_datum.annotation_group}
    for number, obj in enumerate(root.findall("object"), start=1):
        where = f"{path}: object {number}"
        anno = None
        difficult = False
        for child in obj:
            if child.tag == "name":
                name = (child.text or "").strip()
                if name not in name_to_label:
                    raise CalibratorError(f"{where}: name {name!r} is not in the label map "
                                          f"({', '.join(sorted(name_to_label))})")
                label = name_to_label[name]
                group = groups.get(label)
                if group is None:
                    group = groups[label] = anno_datum.annotation_group.add(group_label=label)
                instance = group.annotation[-1].instance_id + 1 if len(group.annotation) else 0
                anno = group.annotation.add(instance_id=instance)
            elif child.tag == "difficult":
                difficult = (child.text or "").strip() == "1"
            elif child.tag == "bndbox":
                if anno is None:
                    raise CalibratorError(f"{where}: <bndbox> before <name>")
                xmin, ymin, xmax, ymax = (_xml_int(child, t, where)
                                          for t in ("xmin", "ymin", "xmax", "ymax"))
                if (min(xmin, xmax) < 0 or max(xmin, xmax) > width or min(ymin, ymax) < 0
                        or max(ymin, ymax) > height):
                    log.warning("%s: bounding box exceeds the image boundary", where)
                if xmin > xmax or ymin > ymax:
                    log.warning("%s: bounding box irregular (min > max)", where)
                box = anno.bbox
                box.xmin = float(F32(xmin) / F32(width))
                box.ymin = float(F32(ymin) / F32(height))
                box.xmax = float(F32(xmax) / F32(width))
                box.ymax = float(F32(ymax) / F32(height))
                box.difficult = difficult


def _extension(name: str) -> str:
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return "jpg" if ext == "jpeg" else ext


def make_annotated_datum(image_path: str | os.PathLike, label_path: str | os.PathLike,
                         name_to_label: dict[str, int], *, resize: tuple[int, int] = (0, 0),
                         encode_type: str | None = None, is_color: bool = True):
    """``ReadRichImageToAnnotatedDatum`` for one list entry (XML labels, encoded image)."""
    image_path, label_path = Path(image_path), Path(label_path)
    raw = read_bytes(image_path, "image")
    flag = cv2.IMREAD_COLOR if is_color else cv2.IMREAD_GRAYSCALE
    image = cv2.imdecode(np.frombuffer(raw, np.uint8), flag)
    if image is None:
        raise CalibratorError(f"{image_path}: cannot decode image")
    original_height, original_width = image.shape[:2]
    anno_datum = caffe_pb2.AnnotatedDatum(type=caffe_pb2.AnnotatedDatum.BBOX)
    datum = anno_datum.datum
    height, width = resize
    own = _extension(image_path.name)
    target = _extension("." + encode_type) if encode_type else own
    if height > 0 and width > 0:
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    if (height > 0 and width > 0) or target != own:
        ok, buffer = cv2.imencode("." + target, image)
        if not ok:
            raise CalibratorError(f"{image_path}: cannot encode the image as {target!r}")
        datum.data = buffer.tobytes()
    else:
        datum.data = raw
    datum.channels = 1 if image.ndim == 2 else image.shape[2]
    datum.height, datum.width = image.shape[:2]
    datum.label = -1
    datum.encoded = True
    if not label_path.is_file():
        raise CalibratorError(f"{label_path}: annotation file not found (for {image_path})")
    read_voc_xml(label_path, name_to_label, original_height, original_width, anno_datum)
    return anno_datum


# --- the LMDB writer --------------------------------------------------------------------

@dataclass
class AnnosetSummary:
    path: Path
    images: int = 0
    boxes: int = 0
    difficult: int = 0
    per_label: dict[int, int] = field(default_factory=dict)
    bytes: int = 0

    def lines(self) -> list[str]:
        labels = ", ".join(f"{k}: {v}" for k, v in sorted(self.per_label.items())) or "none"
        return [f"wrote {self.path}: {self.images} images, {self.boxes} boxes "
                f"({self.difficult} difficult), boxes per label {{{labels}}}, "
                f"{self.bytes / 1e6:.1f} MB"]


def annoset_key(index: int, image: str) -> bytes:
    """``create_annoset``'s key: the line index as 8 digits, '_', the image as listed."""
    return f"{index:08d}_{image}".encode("utf-8", errors="surrogateescape")


def write_annoset(list_path: str | os.PathLike, out_path: str | os.PathLike,
                  label_map_path: str | os.PathLike, *, root: str | os.PathLike | None = None,
                  resize: tuple[int, int] = (0, 0), encode_type: str | None = None,
                  is_color: bool = True, force: bool = False) -> AnnosetSummary:
    """Write the LMDB ``out_path`` (a folder holding data.mdb) from a ``create_annoset``
    list; paths in the list are relative to ``root`` (default: the list's folder). Written
    to a temporary folder beside ``out_path`` and renamed into place when complete; an
    existing ``out_path`` is replaced only with ``force``."""
    list_path, out_path = Path(list_path), Path(out_path)
    if out_path.exists() and not force:
        raise CalibratorError(f"{out_path} already exists (use --force to replace it)")
    if out_path.exists() and not out_path.is_dir():
        raise CalibratorError(f"{out_path} exists and is not a folder")
    if (resize[0] > 0) != (resize[1] > 0):
        raise CalibratorError("resize needs both a height and a width")
    root = Path(root) if root is not None else list_path.parent
    entries = read_annoset_list(list_path)
    name_to_label = load_label_map(label_map_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent))
    summary = AnnosetSummary(out_path)
    try:
        map_size = 1 << 26
        env = lmdb.open(str(tmp), map_size=map_size, subdir=True)
        try:
            pending: list[tuple[bytes, bytes]] = []

            def flush():
                nonlocal map_size
                while pending:
                    try:
                        with env.begin(write=True) as txn:
                            for key, value in pending:
                                txn.put(key, value)
                        pending.clear()
                    except lmdb.MapFullError:
                        map_size *= 2
                        env.set_mapsize(map_size)

            for index, (image, label_file, _) in enumerate(entries):
                datum = make_annotated_datum(root / image, root / label_file, name_to_label,
                                             resize=resize, encode_type=encode_type,
                                             is_color=is_color)
                value = datum.SerializeToString()
                pending.append((annoset_key(index, image), value))
                summary.images += 1
                summary.bytes += len(value)
                for group in datum.annotation_group:
                    n = len(group.annotation)
                    summary.boxes += n
                    summary.difficult += sum(a.bbox.difficult for a in group.annotation)
                    summary.per_label[group.group_label] = (
                        summary.per_label.get(group.group_label, 0) + n)
                if len(pending) >= 1000:  # create_annoset commits every 1000 records
                    flush()
            flush()
        finally:
            env.close()
        _replace_dir(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _replace_dir(new: Path, target: Path) -> None:
    """Move the folder ``new`` to ``target``, an existing ``target`` moved aside first and
    removed only once the new one is in place."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
