"""A reader for the ncnn files our writer produces, written from ncnn's loaders
(src/paramdict.cpp ``ParamDict::load_param``, src/modelbin.cpp ``ModelBinFromDataReader::load``
and each layer's ``load_model``), independent of calibrator.ncnn: what a real ncnn would read
back from the bytes."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ReadLayer:
    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, object]
    blobs: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (storage, values)


def _value(text: str):
    return float(text) if ("." in text or "e" in text.lower()) else int(text)


def read_param(text: str) -> list[ReadLayer]:
    lines = text.split("\n")
    assert lines[0].strip() == "7767517"
    layer_count, blob_count = (int(v) for v in lines[1].split())
    layers = []
    for line in lines[2:2 + layer_count]:
        parts = line.split()
        kind, name, nb, nt = parts[0], parts[1], int(parts[2]), int(parts[3])
        bottoms, tops = parts[4:4 + nb], parts[4 + nb:4 + nb + nt]
        params = {}
        for item in parts[4 + nb + nt:]:
            key, value = item.split("=")
            key = int(key)
            if key <= -23300:
                values = value.split(",")
                params[-23300 - key] = [_value(v) for v in values[1:1 + int(values[0])]]
            else:
                params[key] = _value(value)
        layers.append(ReadLayer(kind, name, bottoms, tops, params))
    names = {b for layer in layers for b in layer.bottoms + layer.tops}
    assert len(names) == blob_count, (len(names), blob_count)
    return layers


class _Bin:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def raw(self, count: int) -> np.ndarray:
        out = np.frombuffer(self.data, "<f4", count, self.pos).copy()
        self.pos += 4 * count
        return out

    def tagged(self, count: int) -> tuple[str, np.ndarray]:
        (tag,) = struct.unpack_from("<I", self.data, self.pos)
        self.pos += 4
        if tag == 0x000D4B38:
            out = ("int8", np.frombuffer(self.data, np.int8, count, self.pos).copy())
            self.pos += count
        elif tag == 0x01306B47:
            out = ("fp16", np.frombuffer(self.data, "<f2", count, self.pos).astype(np.float32))
            self.pos += 2 * count
        else:
            assert tag == 0, hex(tag)
            return ("fp32", self.raw(count))
        self.pos += -self.pos % 4
        return out


def read_model(param_text: str, bin_data: bytes) -> list[ReadLayer]:
    layers = read_param(param_text)
    reader = _Bin(bin_data)
    for layer in layers:
        p = layer.params
        if layer.type in ("Convolution", "ConvolutionDepthWise"):
            layer.blobs.append(reader.tagged(p[6]))
            if p.get(5, 0):
                layer.blobs.append(("fp32", reader.raw(p[0])))
            term = p.get(8, 0)
            if term:
                per = p.get(7, 1) if layer.type == "ConvolutionDepthWise" else p[0]
                layer.blobs.append(("fp32", reader.raw(per)))
                layer.blobs.append(("fp32", reader.raw(1)))
                if term > 100:
                    layer.blobs.append(("fp32", reader.raw(1)))
        elif layer.type == "InnerProduct":
            layer.blobs.append(reader.tagged(p[2]))
            if p.get(1, 0):
                layer.blobs.append(("fp32", reader.raw(p[0])))
            if p.get(8, 0):
                layer.blobs.append(("fp32", reader.raw(p[0])))
                layer.blobs.append(("fp32", reader.raw(1)))
        elif layer.type == "BatchNorm":
            layer.blobs.extend(("fp32", reader.raw(p[0])) for _ in range(4))
        elif layer.type == "Scale" and p[0] != -233:
            layer.blobs.extend(("fp32", reader.raw(p[0])) for _ in range(1 + p.get(1, 0)))
    assert reader.pos == len(bin_data), (reader.pos, len(bin_data))
    return layers
