"""Caffe's Data layer with ``backend: LMDB``: serialized ``Datum`` values read in key order
(the LMDB cursor's order), wrapping to the first key after the last, as Caffe does."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import cv2
import lmdb
import numpy as np
from google.protobuf.message import DecodeError

from calibrator.caffe import caffe_pb2
from calibrator.data.paths import looked_in, resolve_path
from calibrator.data.sources import DataSource, register
from calibrator.data.transform import Transform, warn_legacy_fields
from calibrator.errors import CalibratorError, LayerError, shorten
from calibrator.fileio import human_size, input_file

log = logging.getLogger(__name__)

_LMDB = 1  # DataParameter.DB.LMDB (LEVELDB = 0 is the default)


_META = struct.Struct("<IIQQ")  # mm_magic, mm_version, mm_address, mm_mapsize
_MAGIC = 0xBEEFC0DE
_PAGE_HEADER = 16  # PAGEHDRSZ: a meta page holds its MDB_meta after it
_PAGE_SIZE_AT = 24  # MDB_meta.mm_dbs[FREE_DBI].md_pad: the page size
_LAST_PAGE_AT = 120  # MDB_meta.mm_last_pg, then mm_txnid


def check_lmdb(path: Path) -> None:
    """Refuse an LMDB whose data file is shorter than its own meta pages say: LMDB maps the
    file and trusts them, and touching a page past the end of the file kills the process
    with SIGBUS. Also refuses a data file that is not a regular file."""
    data = path / "data.mdb" if path.is_dir() else path
    input_file(data, "LMDB")
    size = data.stat().st_size
    with open(data, "rb") as f:
        head = f.read(_PAGE_HEADER + 160)
        if len(head) < _PAGE_HEADER + 160:
            raise CalibratorError(f"LMDB {shorten(data)} is truncated or not an LMDB "
                                  f"({size} bytes)")
        magic, _, _, _ = _META.unpack_from(head, _PAGE_HEADER)
        if magic != _MAGIC:
            return  # not an LMDB: lmdb.open says so
        page = struct.unpack_from("<I", head, _PAGE_HEADER + _PAGE_SIZE_AT)[0]
        if page < 512 or page > (1 << 20) or page & (page - 1):
            raise CalibratorError(f"LMDB {shorten(data)}: page size {page} in its header "
                                  "is not valid (a damaged file?)")
        metas = [head]
        f.seek(page)
        metas.append(f.read(_PAGE_HEADER + 160))
    needed = 2 * page
    for meta in metas:
        if len(meta) < _PAGE_HEADER + 160 or \
                _META.unpack_from(meta, _PAGE_HEADER)[0] != _MAGIC:
            continue
        last, _txn = struct.unpack_from("<QQ", meta, _PAGE_HEADER + _LAST_PAGE_AT)
        needed = max(needed, (last + 1) * page)
    if size < needed:
        raise CalibratorError(f"LMDB {shorten(data)} is truncated: {human_size(size)}, its "
                              f"header says {human_size(needed)}")


@register("Data")
class LmdbDataSource(DataSource):
    def __init__(self, path: Path, *, tops, batch_size: int, transform: Transform,
                 cache: bool = True, layer=None):
        super().__init__(tops, batch_size, transform, cache=cache, layer=layer)
        self._path = path
        try:
            check_lmdb(path)
        except CalibratorError as exc:
            raise self.error(str(exc)) from None
        try:
            self._env = lmdb.open(str(path), readonly=True, lock=False, readahead=False,
                                  subdir=path.is_dir())
            with self._env.begin() as txn:
                self._keys = list(txn.cursor().iternext(keys=True, values=False))
        except lmdb.Error as exc:
            raise self.error(f"cannot open LMDB {shorten(path)}: {exc}") from None
        if not self._keys:
            raise self.error(f"LMDB {shorten(path)} is empty")
        self._labels: dict[int, float] = {}

    @classmethod
    def from_layer(cls, layer, base_dir: Path, *, cache: bool = True) -> "LmdbDataSource":
        param = layer.data_param

        def fail(message):
            return LayerError(layer.name, layer.type, message)

        if len(layer.top) not in (1, 2):
            raise fail(f"needs 1 or 2 tops (data[, label]), has {len(layer.top)}")
        if param.backend != _LMDB:
            raise fail("only backend: LMDB is supported (LEVELDB is Caffe's default; set "
                       "backend: LMDB if the database is an LMDB)")
        if param.batch_size < 1:
            raise fail("data_param.batch_size must be at least 1")
        if not param.source:
            raise fail("data_param.source is not set")
        path = resolve_path(param.source, base_dir)
        if path is None:
            raise fail(f"LMDB {param.source} not found ({looked_in(param.source, base_dir)})")
        warn_legacy_fields(layer, param)
        if getattr(param, "shuffle", False):
            log.warning("layer '%s': data_param.shuffle (Intel Caffe) is ignored: keys are "
                        "read in order", layer.name)
        return cls(path, tops=list(layer.top), batch_size=param.batch_size,
                   transform=Transform.from_layer(layer, base_dir), cache=cache,
                   layer=(layer.name, layer.type))

    def num_samples(self) -> int:
        return len(self._keys)

    def encoded(self) -> bool:
        """Whether the first Datum holds an encoded image (Intel's transform_param.pad
        applies only to those)."""
        return bool(self._read(0).encoded)

    def input_files(self) -> list[Path]:
        files = [self._path]
        if self._path.is_dir():
            files += [self._path / "data.mdb", self._path / "lock.mdb"]
        return files + self.transform.input_files()

    def _describe(self, sample: int) -> str:
        key = self._keys[sample].decode("utf-8", "replace")
        return f"LMDB {shorten(self._path)} key '{shorten(key)}'"

    def _label(self, sample: int) -> float:
        return self._labels[sample]

    def _read(self, sample: int):
        """Fetch and parse the Datum in the calling thread (one reader, no LMDB locking)."""
        with self._env.begin() as txn:
            raw = txn.get(self._keys[sample])
        datum = caffe_pb2.Datum()
        try:
            datum.ParseFromString(raw)
        except DecodeError:
            raise self.error(f"{self._describe(sample)}: value is not a serialized Datum") from None
        self._labels[sample] = float(datum.label)
        return datum

    def _decode(self, sample: int, datum) -> np.ndarray:
        if datum.encoded:
            image = cv2.imdecode(np.frombuffer(datum.data, np.uint8),
                                 self.transform.imdecode_flag())
            if image is None:
                raise self.error(f"{self._describe(sample)}: cannot decode the encoded image")
            return self._prepared(sample, self.transform.prepare_image, image)
        shape = (datum.channels, datum.height, datum.width)
        if datum.data:
            values = np.frombuffer(datum.data, np.uint8)
        else:
            values = np.array(datum.float_data, dtype=np.float32)
        if min(shape) < 1 or values.size != int(np.prod(shape)):
            raise self.error(f"{self._describe(sample)}: Datum holds {values.size} values for "
                             f"channels x height x width = {'x'.join(map(str, shape))}")
        return self._prepared(sample, self.transform.prepare_chw, values.reshape(shape))
