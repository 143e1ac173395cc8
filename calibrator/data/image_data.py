"""Caffe's ImageData layer: a list file of ``path label`` lines, images read with OpenCV
(``ReadImageToCVMat``: BGR or grayscale, bilinear resize to new_height x new_width)."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from calibrator.data.paths import looked_in, resolve_path
from calibrator.data.sources import DataSource, register
from calibrator.data.transform import Transform, warn_legacy_fields
from calibrator.errors import CalibratorError, LayerError, shorten
from calibrator.fileio import input_file, read_bytes
from calibrator.limits import check_blob

log = logging.getLogger(__name__)

#: ``shuffle: true`` reorders the list with this seed (Caffe's own RNG cannot be reproduced).
SHUFFLE_SEED = 0

def read_image_list(path: Path) -> list[tuple[str, int, int]]:
    """(image path, label, line number) per non-blank line. As in current BVLC Caffe the
    label is after the last space, so paths may contain spaces."""
    text = read_bytes(path, "list file").decode("utf-8", errors="surrogateescape")
    entries = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        try:
            if len(parts) != 2:
                raise ValueError
            label = int(parts[1])
        except ValueError:
            raise CalibratorError(f"{path}:{number}: expected 'IMAGE_PATH LABEL' (integer "
                                  f"label), got '{shorten(line.strip())}'") from None
        entries.append((parts[0], label, number))
    if not entries:
        raise CalibratorError(f"list file {path} is empty")
    return entries


def _candidates(name: str, base_dir: Path) -> list[Path]:
    """Where ``resolve_path`` may find ``name`` (without looking)."""
    path = Path(name)
    return [path] if path.is_absolute() else [Path(base_dir) / path, Path.cwd() / path]


@register("ImageData")
class ImageDataSource(DataSource):
    def __init__(self, entries, list_path: Path, root_folder: str, base_dir: Path, *,
                 tops, batch_size: int, transform: Transform, new_size=(0, 0),
                 is_color: bool = True, shuffle: bool = False, cache: bool = True,
                 layer=None):
        super().__init__(tops, batch_size, transform, cache=cache, layer=layer)
        self._entries = entries
        self._list_path = list_path
        self._root_folder = root_folder
        self._base_dir = base_dir
        self._new_size = tuple(new_size)  # (height, width), (0, 0) for none
        self._imread_flag = cv2.IMREAD_COLOR if is_color else cv2.IMREAD_GRAYSCALE
        self._shuffle = shuffle
        self._permutations: dict[int, np.ndarray] = {}

    @classmethod
    def from_layer(cls, layer, base_dir: Path, *, cache: bool = True) -> "ImageDataSource":
        param = layer.image_data_param

        def fail(message):
            return LayerError(layer.name, layer.type, message)

        if len(layer.top) != 2:
            raise fail(f"needs 2 tops (data, label), has {len(layer.top)}")
        if param.batch_size < 1:
            raise fail("image_data_param.batch_size must be at least 1")
        if (param.new_height > 0) != (param.new_width > 0):
            raise fail("new_height and new_width must be set together")
        if param.new_height > 0:
            check_blob((param.batch_size, 3 if param.is_color else 1, param.new_height,
                        param.new_width), "its top (new_height x new_width)", fail)
        if getattr(param, "min_height", 0) or getattr(param, "min_width", 0):
            raise fail("min_height/min_width (Intel Caffe) are not supported")
        if not param.source:
            raise fail("image_data_param.source is not set")
        list_path = resolve_path(param.source, base_dir)
        if list_path is None:
            raise fail(f"list file {param.source} not found "
                       f"({looked_in(param.source, base_dir)})")
        try:
            entries = read_image_list(list_path)
        except CalibratorError as exc:
            raise fail(str(exc)) from None
        warn_legacy_fields(layer, param)
        if param.shuffle:
            log.warning("layer '%s': shuffle: the list is shuffled with a fixed seed (%d), "
                        "not in Caffe's order", layer.name, SHUFFLE_SEED)
        return cls(entries, list_path, param.root_folder, base_dir, tops=list(layer.top),
                   batch_size=param.batch_size, transform=Transform.from_layer(layer, base_dir),
                   new_size=(param.new_height, param.new_width), is_color=param.is_color,
                   shuffle=param.shuffle, cache=cache, layer=(layer.name, layer.type))

    def num_samples(self) -> int:
        return len(self._entries)

    def _sample_at(self, position: int) -> int:
        """Caffe reshuffles at each pass over the list; here each pass has its own seeded
        permutation, so the stream is the same from run to run."""
        epoch, offset = divmod(position, len(self._entries))
        if not self._shuffle:
            return offset
        if epoch not in self._permutations:
            rng = np.random.default_rng((SHUFFLE_SEED, epoch))
            self._permutations[epoch] = rng.permutation(len(self._entries))
        return int(self._permutations[epoch][offset])

    def _label(self, sample: int) -> float:
        return float(self._entries[sample][1])

    def _describe(self, sample: int) -> str:
        name, _, number = self._entries[sample]
        return f"{shorten(self._list_path)}:{number} ({shorten(name)})"

    def input_files(self) -> list[Path]:
        """The list and every image it names (each place it may be read from)."""
        files = [self._list_path]
        for name, _, _ in self._entries:
            files.extend(_candidates(self._root_folder + name, self._base_dir))
        return files + self.transform.input_files()

    def _decode(self, sample: int, raw) -> np.ndarray:
        name = self._root_folder + self._entries[sample][0]  # Caffe concatenates as strings
        try:
            path = resolve_path(name, self._base_dir)
            if path is not None:
                input_file(path, "image")
        except CalibratorError as exc:
            raise self.error(f"{self._describe(sample)}: {exc}") from None
        if path is None:
            hint = ("; root_folder has no trailing '/'"
                    if self._root_folder and not self._root_folder.endswith("/") else "")
            raise self.error(f"{self._describe(sample)}: image {shorten(name)} not found "
                             f"({looked_in(name, self._base_dir)}{hint})")
        image = cv2.imread(str(path), self._imread_flag)
        if image is None:
            raise self.error(f"{self._describe(sample)}: cannot read image {path}")
        if self._new_size[0] > 0:
            height, width = self._new_size
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        return self._prepared(sample, self.transform.prepare_image, image)
