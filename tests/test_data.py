"""Data sources against hand-computed values on tiny synthetic images (PNG: lossless)."""

from __future__ import annotations

import cv2
import lmdb
import numpy as np
import pytest
import torch
from google.protobuf import text_format

from calibrator.caffe import caffe_pb2
from calibrator.data import build_data_source, build_image_folder_source, is_data_layer
from calibrator.errors import CalibratorError


def layer_from(text: str) -> caffe_pb2.LayerParameter:
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def image_data_layer(source="list.txt", batch_size=1, transform="", extra=""):
    return layer_from(f"""
        name: "data" type: "ImageData" top: "data" top: "label"
        transform_param {{ {transform} }}
        image_data_param {{ source: "{source}" batch_size: {batch_size} {extra} }}""")


def write_png(path, image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.asarray(image, dtype=np.uint8))


def write_list(path, lines) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))


def solid(height, width, bgr):
    return np.broadcast_to(np.array(bgr, np.uint8), (height, width, 3)).copy()


def f32(x):
    return np.float32(x)


# --- transform ----------------------------------------------------------------------------

def test_center_crop_offsets_on_odd_sizes(tmp_path):
    # 7x9 image whose pixel (h, w, c) holds 80c + 10h + w; crop 4 -> offsets (1, 2).
    h, w, c = np.meshgrid(np.arange(7), np.arange(9), np.arange(3), indexing="ij")
    write_png(tmp_path / "a.png", 80 * c + 10 * h + w)
    write_list(tmp_path / "list.txt", ["a.png 0"])
    source = build_data_source(image_data_layer(transform="crop_size: 4"), tmp_path)
    data = source.batch(0)["data"]
    assert data.shape == (1, 3, 4, 4)
    for ch in range(3):
        for i in range(4):
            for j in range(4):
                assert data[0, ch, i, j] == 80 * ch + 10 * (i + 1) + (j + 2)


@pytest.mark.parametrize("means, expected_means", [
    ("mean_value: 1 mean_value: 2 mean_value: 3", (1, 2, 3)),
    ("mean_value: 4", (4, 4, 4)),
])
def test_mean_value_then_scale(tmp_path, means, expected_means):
    write_png(tmp_path / "a.png", solid(2, 3, (10, 20, 30)))
    write_list(tmp_path / "list.txt", ["a.png 0"])
    layer = image_data_layer(transform=f"scale: 0.5 {means}")
    data = build_data_source(layer, tmp_path).batch(0)["data"]
    for ch, (pixel, mean) in enumerate(zip((10, 20, 30), expected_means)):
        assert torch.all(data[0, ch] == (pixel - mean) * 0.5)


def test_float32_order_matches_caffe(tmp_path):
    """(pixel - mean) * scale, each step rounded to float32 as Caffe's Dtype arithmetic."""
    write_png(tmp_path / "a.png", solid(1, 1, (0, 128, 255)))
    write_list(tmp_path / "list.txt", ["a.png 0"])
    layer = image_data_layer(
        transform="scale: 0.017 mean_value: 103.53 mean_value: 116.28 mean_value: 123.675")
    data = build_data_source(layer, tmp_path).batch(0)["data"].numpy().ravel()
    expected = [(f32(p) - f32(m)) * f32(0.017)
                for p, m in zip((0, 128, 255), (103.53, 116.28, 123.675))]
    assert data.tolist() == [float(e) for e in expected]


def write_mean_file(path, mean, legacy=False) -> None:
    blob = caffe_pb2.BlobProto()
    if legacy:
        blob.num, (blob.channels, blob.height, blob.width) = 1, mean.shape
    else:
        blob.shape.dim.extend((1, *mean.shape))
    blob.data.extend(mean.ravel().tolist())
    path.write_bytes(blob.SerializeToString())


@pytest.mark.parametrize("legacy", [False, True])
def test_mean_file_is_cut_at_the_crop_offset(tmp_path, legacy):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    mean = rng.uniform(0, 255, (3, 5, 6)).astype(np.float32)
    write_png(tmp_path / "a.png", image)
    write_mean_file(tmp_path / "mean.binaryproto", mean, legacy)
    write_list(tmp_path / "list.txt", ["a.png 0"])
    layer = image_data_layer(transform='crop_size: 3 scale: 0.25 mean_file: "mean.binaryproto"')
    data = build_data_source(layer, tmp_path).batch(0)["data"].numpy()
    flat_mean, (height, width), (h_off, w_off) = mean.ravel(), (5, 6), (1, 1)
    for c in range(3):
        for h in range(3):
            for w in range(3):  # Caffe's index: (c * H + h_off + h) * W + w_off + w
                m = flat_mean[(c * height + h_off + h) * width + w_off + w]
                pixel = image[h_off + h, w_off + w, c]
                assert data[0, c, h, w] == (f32(pixel) - m) * f32(0.25)


def test_new_height_new_width_is_cv2_bilinear_resize(tmp_path):
    image = np.random.default_rng(2).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", image)
    write_list(tmp_path / "list.txt", ["a.png 0"])
    layer = image_data_layer(extra="new_height: 5 new_width: 7")
    data = build_data_source(layer, tmp_path).batch(0)["data"]
    expected = cv2.resize(image, (7, 5), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
    assert data.shape == (1, 3, 5, 7)
    assert torch.equal(data[0], torch.from_numpy(expected.astype(np.float32)))
    assert not np.array_equal(expected, image[:5, :7].transpose(2, 0, 1))  # really resized


def test_ssd_resize_param_warp_then_crop_h_crop_w(tmp_path):
    image = np.random.default_rng(4).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", image)
    write_list(tmp_path / "list.txt", ["a.png 0"])
    transform = ("crop_h: 3 crop_w: 4 "
                 "resize_param { resize_mode: WARP height: 6 width: 8 interp_mode: AREA }")
    data = build_data_source(image_data_layer(transform=transform), tmp_path).batch(0)["data"]
    warped = cv2.resize(image, (8, 6), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
    assert torch.equal(data[0], torch.from_numpy(warped[:, 1:4, 2:6].astype(np.float32)))


def test_is_color_false_gives_one_gray_channel(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    write_png(tmp_path / "g.png", gray)
    write_png(tmp_path / "c.png", solid(3, 4, (50, 50, 50)))  # color file read as gray
    write_list(tmp_path / "list.txt", ["g.png 0", "c.png 1"])
    source = build_data_source(image_data_layer(batch_size=2, extra="is_color: false"), tmp_path)
    assert source.top_shapes() == {"data": (2, 1, 3, 4), "label": (2,)}
    data = source.batch(0)["data"]
    assert torch.equal(data[0, 0], torch.from_numpy(gray.astype(np.float32)))
    assert torch.all(data[1, 0] == 50)


# --- ImageData list -----------------------------------------------------------------------

def test_list_wraps_around_like_caffe(tmp_path):
    for i in range(3):
        write_png(tmp_path / f"{i}.png", solid(2, 2, (i, i, i)))
    write_list(tmp_path / "list.txt", [f"{i}.png {10 + i}" for i in range(3)])
    source = build_data_source(image_data_layer(batch_size=2), tmp_path)
    assert source.num_samples() == 3
    batches = [source.batch(b) for b in range(3)]
    assert [b["label"].tolist() for b in batches] == [[10, 11], [12, 10], [11, 12]]
    assert [b["data"][:, 0, 0, 0].tolist() for b in batches] == [[0, 1], [2, 0], [1, 2]]


def test_parallel_decode_keeps_list_order(tmp_path):
    for i in range(40):
        write_png(tmp_path / f"img{i:02d}.png", solid(3, 3, (i, 2 * i, 3 * i)))
    write_list(tmp_path / "list.txt", [f"img{i:02d}.png {i}" for i in reversed(range(40))])
    batch = build_data_source(image_data_layer(batch_size=40), tmp_path).batch(0)
    assert batch["label"].tolist() == list(reversed(range(40)))
    assert torch.equal(batch["data"][:, 0, 1, 1], batch["label"])
    assert torch.equal(batch["data"][:, 2, 1, 1], 3 * batch["label"])


def test_root_folder_paths_with_spaces_crlf_and_blank_lines(tmp_path):
    write_png(tmp_path / "imgs" / "my cat.png", solid(2, 2, (7, 7, 7)))
    (tmp_path / "list.txt").write_bytes(b"my cat.png 3\r\n\r\n")
    layer = image_data_layer(extra='root_folder: "imgs/"')
    batch = build_data_source(layer, tmp_path).batch(0)
    assert batch["label"].tolist() == [3] and torch.all(batch["data"] == 7)


def test_shuffle_is_a_seeded_permutation_per_pass(tmp_path):
    for i in range(6):
        write_png(tmp_path / f"{i}.png", solid(1, 1, (i, i, i)))
    write_list(tmp_path / "list.txt", [f"{i}.png {i}" for i in range(6)])
    layer = image_data_layer(batch_size=3, extra="shuffle: true")
    labels = [build_data_source(layer, tmp_path).batch(b)["label"].tolist() for b in range(4)]
    again = [build_data_source(layer, tmp_path).batch(b)["label"].tolist() for b in range(4)]
    assert labels == again
    first_pass, second_pass = labels[0] + labels[1], labels[2] + labels[3]
    assert sorted(first_pass) == sorted(second_pass) == list(range(6))
    assert first_pass != list(range(6))


def test_relative_paths_prototxt_folder_first_then_cwd(tmp_path, monkeypatch):
    model_dir, cwd = tmp_path / "model", tmp_path / "cwd"
    for folder, value in ((model_dir, 1), (cwd, 2)):
        write_png(folder / "imgs" / "a.png", solid(1, 1, (value,) * 3))
        write_list(folder / "list.txt", [f"a.png {value}"])
    monkeypatch.chdir(cwd)
    layer = image_data_layer(extra='root_folder: "imgs/"')
    batch = build_data_source(layer, model_dir).batch(0)
    assert batch["label"].tolist() == [1] and batch["data"].flatten().tolist() == [1, 1, 1]
    (model_dir / "list.txt").unlink()
    (model_dir / "imgs" / "a.png").unlink()
    batch = build_data_source(layer, model_dir).batch(0)
    assert batch["label"].tolist() == [2] and batch["data"].flatten().tolist() == [2, 2, 2]


def test_cache_decodes_each_image_once(tmp_path, monkeypatch):
    for i in range(4):
        write_png(tmp_path / f"{i}.png", solid(4, 4, (i, i, i)))
    write_list(tmp_path / "list.txt", [f"{i}.png {i}" for i in range(4)])
    calls = []
    real_imread = cv2.imread
    monkeypatch.setattr(cv2, "imread", lambda *a: calls.append(a[0]) or real_imread(*a))
    layer = image_data_layer(batch_size=2, transform="scale: 2")
    cached = build_data_source(layer, tmp_path)
    first = [cached.batch(b)["data"] for b in range(2)]
    assert len(calls) == 4
    second = [cached.batch(b)["data"] for b in range(4)]  # second pass and a wrap-around
    assert len(calls) == 4
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    uncached = build_data_source(layer, tmp_path, cache=False)
    uncached.batch(0), uncached.batch(0)
    assert len(calls) == 8


def test_images_of_different_sizes_without_crop_fail(tmp_path):
    write_png(tmp_path / "a.png", solid(2, 2, (0, 0, 0)))
    write_png(tmp_path / "b.png", solid(3, 2, (0, 0, 0)))
    write_list(tmp_path / "list.txt", ["a.png 0", "b.png 0"])
    with pytest.raises(CalibratorError, match=r"list.txt:2 \(b.png\)"):
        build_data_source(image_data_layer(batch_size=2), tmp_path).batch(0)


# --- LMDB ---------------------------------------------------------------------------------

def write_lmdb(path, datums: dict[bytes, caffe_pb2.Datum | bytes]) -> None:
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, datum in datums.items():
            txn.put(key, datum if isinstance(datum, bytes) else datum.SerializeToString())
    env.close()


def data_layer(source, batch_size=1, transform="", tops=('data', 'label'), backend="LMDB"):
    top_lines = " ".join(f'top: "{t}"' for t in tops)
    return layer_from(f"""
        name: "data" type: "Data" {top_lines}
        transform_param {{ {transform} }}
        data_param {{ source: "{source}" batch_size: {batch_size} backend: {backend} }}""")


def test_lmdb_raw_datums_in_key_order_with_wrap(tmp_path):
    chw = [np.arange(24, dtype=np.uint8).reshape(2, 3, 4) + 100 * i for i in range(2)]
    datums = {
        b"00000001": caffe_pb2.Datum(channels=2, height=3, width=4, data=chw[1].tobytes(), label=7),
        b"00000000": caffe_pb2.Datum(channels=2, height=3, width=4, data=chw[0].tobytes(), label=5),
    }
    write_lmdb(tmp_path / "db", datums)
    source = build_data_source(data_layer("db", batch_size=3), tmp_path)
    assert source.num_samples() == 2
    assert source.top_shapes() == {"data": (3, 2, 3, 4), "label": (3,)}
    batch = source.batch(0)
    assert batch["label"].tolist() == [5, 7, 5]
    for got, want in zip(batch["data"], (chw[0], chw[1], chw[0])):
        assert torch.equal(got, torch.from_numpy(want.astype(np.float32)))


def test_lmdb_raw_crop_and_float_data(tmp_path):
    values = np.arange(1 * 5 * 5, dtype=np.float32).reshape(1, 5, 5) / 4
    datum = caffe_pb2.Datum(channels=1, height=5, width=5, label=1)
    datum.float_data.extend(values.ravel().tolist())
    write_lmdb(tmp_path / "db", {b"00000000": datum})
    source = build_data_source(
        data_layer("db", transform="crop_size: 3 mean_value: 1", tops=("data",)), tmp_path)
    batch = source.batch(0)
    assert list(batch) == ["data"]
    assert torch.equal(batch["data"][0], torch.from_numpy(values[:, 1:4, 1:4] - 1))


def encoded_datum(image, label=0) -> caffe_pb2.Datum:
    ok, png = cv2.imencode(".png", image)
    return caffe_pb2.Datum(encoded=True, data=png.tobytes(), label=label)


def test_lmdb_encoded_datums_decode_bgr_or_forced_gray(tmp_path):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    write_lmdb(tmp_path / "db", {b"00000000": encoded_datum(image, label=3)})
    batch = build_data_source(data_layer("db"), tmp_path).batch(0)
    assert batch["label"].tolist() == [3]
    expected = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32))
    assert torch.equal(batch["data"][0], expected)
    # B == G == R: any gray conversion gives the value itself.
    gray = rng.integers(0, 256, (4, 5), dtype=np.uint8)
    write_lmdb(tmp_path / "graydb", {b"00000000": encoded_datum(np.dstack([gray] * 3))})
    forced = build_data_source(data_layer("graydb", transform="force_gray: true"), tmp_path)
    assert forced.batch(0)["data"].shape == (1, 1, 4, 5)
    assert torch.equal(forced.batch(0)["data"][0, 0], torch.from_numpy(gray.astype(np.float32)))


def test_lmdb_encoded_gray_png_native_or_forced_color(tmp_path):
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    write_lmdb(tmp_path / "db", {b"00000000": encoded_datum(gray)})
    native = build_data_source(data_layer("db"), tmp_path).batch(0)["data"]
    assert native.shape == (1, 1, 4, 5)  # decoded as stored (imdecode flag -1)
    color = build_data_source(data_layer("db", transform="force_color: true"), tmp_path)
    assert color.top_shapes()["data"] == (1, 3, 4, 5)
    assert all(torch.equal(color.batch(0)["data"][0, c], native[0, 0]) for c in range(3))


# --- image folder -------------------------------------------------------------------------

def test_image_folder_sorted_resized_mean_and_norm(tmp_path):
    write_png(tmp_path / "b.PNG", solid(6, 8, (20, 40, 60)))
    write_png(tmp_path / "a.png", solid(3, 3, (10, 10, 10)))
    cv2.imwrite(str(tmp_path / "c.bmp"), solid(2, 2, (30, 30, 30)))
    (tmp_path / "notes.txt").write_text("not an image")
    source = build_image_folder_source(tmp_path, "data", (1, 3, 4, 5), (1, 2, 3), 0.5,
                                       batch_size=3)
    assert source.tops == ["data"] and source.num_samples() == 3
    assert source.top_shapes() == {"data": (3, 3, 4, 5)}
    data = source.batch(0)["data"]
    assert set(source.batch(0)) == {"data"}
    assert data.shape == (3, 3, 4, 5)
    assert data[:, :, 0, 0].tolist() == [[4.5, 4, 3.5], [9.5, 19, 28.5], [14.5, 14, 13.5]]
    sized = build_image_folder_source(tmp_path, "data", (1, 3, 4, 5), (0, 0, 0), 1.0, size=(2, 3))
    assert sized.batch_size == 1 and sized.batch(0)["data"].shape == (1, 3, 2, 3)


# --- errors -------------------------------------------------------------------------------

def expect_error(match, build, *args, **kwargs):
    with pytest.raises(CalibratorError, match=match) as info:
        source = build(*args, **kwargs)
        source.batch(0)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_list_file_errors(tmp_path):
    expect_error("list file nope.txt not found", build_data_source,
                 image_data_layer(source="nope.txt"), tmp_path)
    (tmp_path / "empty.txt").write_text("\n  \n")
    expect_error(r"empty.txt is empty", build_data_source,
                 image_data_layer(source="empty.txt"), tmp_path)
    write_list(tmp_path / "bad.txt", ["a.png 0", "b.png zero"])
    expect_error(r"bad.txt:2: expected", build_data_source,
                 image_data_layer(source="bad.txt"), tmp_path)
    write_list(tmp_path / "bad2.txt", ["a.png"])
    expect_error(r"bad2.txt:1: expected", build_data_source,
                 image_data_layer(source="bad2.txt"), tmp_path)


def test_image_missing_or_unreadable(tmp_path):
    write_png(tmp_path / "ok.png", solid(1, 1, (0, 0, 0)))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    write_list(tmp_path / "list.txt", ["ok.png 0", "gone.png 1", "broken.png 2"])
    layer = image_data_layer(batch_size=1)
    source = build_data_source(layer, tmp_path)
    expect_error(r"list.txt:2 \(gone.png\): image gone.png not found", source.batch, 1)
    expect_error(r"list.txt:3 \(broken.png\): cannot read image .*broken.png", source.batch, 2)


def test_lmdb_errors(tmp_path):
    expect_error("LMDB nodb not found", build_data_source, data_layer("nodb"), tmp_path)
    write_lmdb(tmp_path / "empty", {})
    expect_error("LMDB .*empty is empty", build_data_source, data_layer("empty"), tmp_path)
    expect_error("only backend: LMDB", build_data_source,
                 data_layer("empty", backend="LEVELDB"), tmp_path)
    write_lmdb(tmp_path / "junk", {b"00000000": b"\xff\xff\xff"})
    expect_error(r"key '00000000': value is not a serialized Datum",
                 build_data_source, data_layer("junk"), tmp_path)


def test_mean_file_errors(tmp_path):
    write_png(tmp_path / "a.png", solid(2, 2, (0, 0, 0)))
    write_list(tmp_path / "list.txt", ["a.png 0"])
    (tmp_path / "junk.binaryproto").write_bytes(b"\xff\xff\xff\xff")
    write_mean_file(tmp_path / "small.binaryproto", np.zeros((3, 1, 1), np.float32))
    for name, match in (("junk", "junk.binaryproto: not a binary BlobProto"),
                        ("small", r"a.png\): size 3x2x2 differs from the mean file's 3x1x1"),
                        ("missing", "mean file missing.binaryproto not found")):
        layer = image_data_layer(transform=f'mean_file: "{name}.binaryproto"')
        expect_error(match, build_data_source, layer, tmp_path)


def test_image_folder_errors(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    expect_error("no .jpg/.jpeg/.png/.bmp images", build_image_folder_source,
                 tmp_path, "data", (1, 3, 4, 4), (0, 0, 0), 1.0)
    expect_error("not a folder", build_image_folder_source,
                 tmp_path / "nope", "data", (1, 3, 4, 4), (0, 0, 0), 1.0)


def test_layer_type_checks(tmp_path):
    assert is_data_layer("ImageData") and is_data_layer("Data") and is_data_layer("HDF5Data")
    assert not is_data_layer("Convolution") and not is_data_layer("Input")
    expect_error("HDF5Data.*not supported", build_data_source,
                 layer_from('name: "d" type: "HDF5Data" top: "data"'), tmp_path)
    expect_error("not a data layer", build_data_source,
                 layer_from('name: "c" type: "Convolution"'), tmp_path)
    expect_error("new_height and new_width must be set together", build_data_source,
                 image_data_layer(extra="new_height: 4"), tmp_path)


# --- the real ImageNet sample list --------------------------------------------------------

def test_mobilenet_v2_test_prototxt_image_data(shared):
    prototxt = shared / "models" / "mobilenet_v2" / "test.prototxt"
    net = text_format.Parse(prototxt.read_text(), caffe_pb2.NetParameter())
    layer = next(l for l in net.layer if l.type == "ImageData")
    source = build_data_source(layer, prototxt.parent)
    batch = source.batch(0)
    assert batch["data"].shape == (50, 3, 224, 224) and batch["label"].shape == (50,)
    assert batch["label"][0] == 0
    first = (shared / "data" / "imagenet-sample" / "val.txt").read_text().split()[0]
    image = cv2.imread(str(shared / "data" / "imagenet-sample" / "images" / first))
    height, width = image.shape[:2]
    top, left = (height - 224) // 2, (width - 224) // 2
    crop = image[top:top + 224, left:left + 224].transpose(2, 0, 1).astype(np.float32)
    mean = np.array([103.53, 116.28, 123.675], np.float32).reshape(3, 1, 1)
    expected = (crop - mean) * np.float32(0.017)
    assert torch.equal(batch["data"][0], torch.from_numpy(expected))


@pytest.mark.parametrize("pad", [0, 2])
def test_normalize_is_caffes_formula_and_leaves_a_float_batch_alone(pad):
    """``(x - mean) * scale`` in float32, each operation rounded as Caffe rounds it (here
    numpy's float32 arithmetic, written out), for a uint8 batch (normalised in place on its
    float copy) and for a float32 batch, which is the caller's (a cached sample) and must
    come back unchanged; with Intel's pad the border keeps the raw values."""
    from calibrator.data.transform import Transform
    rng = np.random.default_rng(pad)
    transform = Transform(scale=0.017, mean_values=[104.0, 117.0, 123.0], pad=pad)
    images = rng.integers(0, 256, (2, 3, 7, 9), dtype=np.uint8)
    mean = np.array([104.0, 117.0, 123.0], np.float32).reshape(1, 3, 1, 1)
    want = (images.astype(np.float32) - mean) * np.float32(0.017)
    if pad:                  # (Intel rounds the normalised values, half to even)
        want = np.round(want)
    for batch in (torch.from_numpy(images), torch.from_numpy(images.astype(np.float32))):
        kept = batch.clone()
        got = transform.normalize(batch).numpy()
        assert torch.equal(batch, kept)
        inner = (slice(None), slice(None), slice(pad, 7 - pad), slice(pad, 9 - pad))
        assert got.dtype == np.float32 and np.array_equal(got[inner], want[inner])
        if pad:
            assert np.array_equal(got[..., 0], images.astype(np.float32)[..., 0])
