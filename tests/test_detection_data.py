"""AnnotatedData sources (LMDB of AnnotatedDatum, create_annoset list) and make-annoset,
against hand-computed boxes on tiny synthetic PNG images; MobileNet-SSD's test prototxt on an
LMDB of shared faces."""

from __future__ import annotations

import argparse

import cv2
import lmdb
import numpy as np
import pytest
import torch
from google.protobuf import text_format

from calibrator.caffe import caffe_pb2
from calibrator.data import build_data_source
from calibrator.detection.annoset import write_annoset
from calibrator.errors import CalibratorError, LayerError

LABELMAP = """
item { name: "none_of_the_above" label: 0 display_name: "background" }
item { name: "cat" label: 1 display_name: "cat" }
item { name: "dog" label: 2 display_name: "dog" }
"""


def voc_xml(width, height, objects) -> str:
    """objects: (name, difficult, (xmin, ymin, xmax, ymax), difficult_after_box)."""
    parts = [f"<annotation><size><width>{width}</width><height>{height}</height>"
             "<depth>3</depth></size>"]
    for name, difficult, box, after in objects:
        bnd = "<bndbox>" + "".join(f"<{t}>{v}</{t}>" for t, v in
                                   zip(("xmin", "ymin", "xmax", "ymax"), box)) + "</bndbox>"
        diff = f"<difficult>{int(difficult)}</difficult>"
        parts.append(f"<object><name>{name}</name>"
                     + (bnd + diff if after else diff + bnd) + "</object>")
    return "".join(parts) + "</annotation>"


@pytest.fixture
def dataset(tmp_path):
    """a.png 40x20: cat, difficult dog, cat; b.png 16x16: dog, dog (its <difficult>1 after
    the box: Caffe ignores it), a small cat in the corner; c.png 8x8: no object."""
    rng = np.random.default_rng(0)
    specs = {
        "a": (40, 20, [("cat", 0, (10, 5, 30, 15), False), ("dog", 1, (0, 0, 20, 10), False),
                       ("cat", 0, (20, 10, 40, 20), False)]),
        "b": (16, 16, [("dog", 0, (4, 4, 12, 12), False), ("dog", 1, (0, 8, 8, 16), True),
                       ("cat", 0, (0, 0, 2, 2), False)]),
        "c": (8, 8, []),
    }
    (tmp_path / "img").mkdir()
    (tmp_path / "xml").mkdir()
    for name, (w, h, objects) in specs.items():
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        assert cv2.imwrite(str(tmp_path / f"img/{name}.png"), image)
        (tmp_path / f"xml/{name}.xml").write_text(voc_xml(w, h, objects))
    (tmp_path / "list.txt").write_text("".join(f"img/{n}.png xml/{n}.xml\n" for n in specs))
    (tmp_path / "labelmap.prototxt").write_text(LABELMAP)
    return tmp_path


def annotated_layer(source, batch_size=2, transform="", extra=""):
    return text_format.Parse(f"""
        name: "data" type: "AnnotatedData" top: "data" top: "label"
        transform_param {{ {transform} }}
        data_param {{ source: "{source}" batch_size: {batch_size} backend: LMDB }}
        annotated_data_param {{ batch_sampler {{ }} label_map_file: "labelmap.prototxt" }}
        {extra}""", caffe_pb2.LayerParameter())


WARP = ("mean_value: 10 mean_value: 20 mean_value: 30 "
        "resize_param { resize_mode: WARP height: 10 width: 20 interp_mode: LINEAR }")

# label rows of a, b, c (without item_id), no crop: boxes / image size
ROWS = {
    "a": [[1, 0, .25, .25, .75, .75, 0], [1, 1, .5, .5, 1, 1, 0], [2, 0, 0, 0, .5, .5, 1]],
    "b": [[2, 0, .25, .25, .75, .75, 0], [2, 1, 0, .5, .5, 1, 0], [1, 0, 0, 0, .125, .125, 0]],
    "c": [],
}


def with_item(item, rows):
    return [[item, *r] for r in rows]


def test_make_annoset_writes_caffe_records(dataset):
    summary = write_annoset(dataset / "list.txt", dataset / "db", dataset / "labelmap.prototxt")
    assert (summary.images, summary.boxes, summary.difficult) == (3, 6, 1)
    assert summary.per_label == {1: 3, 2: 3}
    env = lmdb.open(str(dataset / "db"), readonly=True, lock=False)
    with env.begin() as txn:
        records = list(txn.cursor())
    env.close()
    assert [k for k, _ in records] == [b"00000000_img/a.png", b"00000001_img/b.png",
                                       b"00000002_img/c.png"]
    a = caffe_pb2.AnnotatedDatum.FromString(records[0][1])
    assert a.type == caffe_pb2.AnnotatedDatum.BBOX
    assert a.datum.encoded and a.datum.data == (dataset / "img/a.png").read_bytes()
    assert (a.datum.channels, a.datum.height, a.datum.width, a.datum.label) == (3, 20, 40, -1)
    groups = [(g.group_label, [(x.instance_id, x.bbox.xmin, x.bbox.ymin, x.bbox.xmax,
                                x.bbox.ymax, x.bbox.difficult) for x in g.annotation])
              for g in a.annotation_group]
    assert groups == [(1, [(0, .25, .25, .75, .75, False), (1, .5, .5, 1, 1, False)]),
                      (2, [(0, 0, 0, .5, .5, True)])]
    b = caffe_pb2.AnnotatedDatum.FromString(records[1][1])
    assert [x.bbox.difficult for x in b.annotation_group[0].annotation] == [False, False]
    c = caffe_pb2.AnnotatedDatum.FromString(records[2][1])
    assert len(c.annotation_group) == 0 and c.datum.height == 8


def test_make_annoset_refuses_to_overwrite_unless_forced(dataset):
    write_annoset(dataset / "list.txt", dataset / "db", dataset / "labelmap.prototxt")
    with pytest.raises(CalibratorError, match="already exists"):
        write_annoset(dataset / "list.txt", dataset / "db", dataset / "labelmap.prototxt")
    (dataset / "list2.txt").write_text("img/c.png xml/c.xml\n")
    write_annoset(dataset / "list2.txt", dataset / "db", dataset / "labelmap.prototxt",
                  force=True)
    env = lmdb.open(str(dataset / "db"), readonly=True, lock=False)
    assert env.stat()["entries"] == 1
    env.close()
    assert sorted(p.name for p in dataset.iterdir() if p.name.startswith(".")) == []


def test_make_annoset_failure_leaves_nothing(dataset):
    (dataset / "xml/b.xml").write_text(voc_xml(16, 16, [("horse", 0, (1, 1, 2, 2), False)]))
    with pytest.raises(CalibratorError, match="horse"):
        write_annoset(dataset / "list.txt", dataset / "db", dataset / "labelmap.prototxt")
    assert not (dataset / "db").exists()
    assert [p for p in dataset.iterdir() if p.name.startswith(".")] == []


def test_make_annoset_resize_reencodes(dataset):
    write_annoset(dataset / "list.txt", dataset / "db", dataset / "labelmap.prototxt",
                  resize=(6, 10))
    env = lmdb.open(str(dataset / "db"), readonly=True, lock=False)
    with env.begin() as txn:
        a = caffe_pb2.AnnotatedDatum.FromString(txn.get(b"00000000_img/a.png"))
    env.close()
    assert (a.datum.height, a.datum.width) == (6, 10)
    decoded = cv2.imdecode(np.frombuffer(a.datum.data, np.uint8), cv2.IMREAD_UNCHANGED)
    expected = cv2.resize(cv2.imread(str(dataset / "img/a.png")), (10, 6),
                          interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(decoded, expected)  # PNG: lossless
    # boxes stay normalised to the original image
    assert a.annotation_group[0].annotation[0].bbox.xmin == pytest.approx(0.25)


def test_make_annoset_cli(dataset, capsys):
    from calibrator.cli import annoset_cmd

    parser = argparse.ArgumentParser()
    annoset_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["make-annoset", str(dataset / "list.txt"), str(dataset / "out"),
                              "--labelmap", str(dataset / "labelmap.prototxt")])
    assert args.run(args) == 0
    assert "3 images, 6 boxes (1 difficult)" in capsys.readouterr().out
    assert (dataset / "out/data.mdb").is_file()


@pytest.mark.parametrize("kind", ["list", "lmdb"])
def test_annotated_batches_hand_computed(dataset, kind):
    source_name = "list.txt"
    if kind == "lmdb":
        write_annoset(dataset / "list.txt", dataset / "db", dataset / "labelmap.prototxt")
        source_name = "db"
    source = build_data_source(annotated_layer(source_name, transform=WARP), dataset)
    assert source.top_shapes() == {"data": (2, 3, 10, 20), "label": (1, 1, 1, 8)}
    first = source.batch(0)
    expected = with_item(0, ROWS["a"]) + with_item(1, ROWS["b"])
    np.testing.assert_array_equal(first["label"].numpy(),
                                  np.array(expected, np.float32).reshape(1, 1, -1, 8))
    image = cv2.resize(cv2.imread(str(dataset / "img/b.png")), (20, 10),
                       interpolation=cv2.INTER_LINEAR).astype(np.float32)
    np.testing.assert_array_equal(first["data"][1].numpy(),
                                  (image - [10, 20, 30]).transpose(2, 0, 1))
    second = source.batch(1)  # c, then a again (Caffe wraps to the start)
    np.testing.assert_array_equal(second["label"].numpy().reshape(-1, 8),
                                  np.array(with_item(1, ROWS["a"]), np.float32))


def test_list_and_lmdb_sources_agree(dataset):
    write_annoset(dataset / "list.txt", dataset / "db", dataset / "labelmap.prototxt")
    a = build_data_source(annotated_layer("list.txt", 3, WARP), dataset).batch(0)
    b = build_data_source(annotated_layer("db", 3, WARP), dataset).batch(0)
    for top in ("data", "label"):
        assert torch.equal(a[top], b[top])


def test_batch_without_boxes_is_one_row_of_minus_one(dataset):
    source = build_data_source(annotated_layer("list.txt", 1, WARP), dataset)
    label = source.batch(2)["label"]
    assert label.shape == (1, 1, 1, 8) and bool((label == -1).all())


def test_crop_projects_clips_and_drops(dataset):
    # b is 16x16, crop 8 -> window [.25, .25, .75, .75]; the corner cat misses it
    (dataset / "b.txt").write_text("img/b.png xml/b.xml\n")
    source = build_data_source(annotated_layer("b.txt", 1, "crop_size: 8"), dataset)
    rows = source.batch(0)["label"].numpy().reshape(-1, 8)
    np.testing.assert_array_equal(rows, np.array([[0, 2, 0, 0, 0, 1, 1, 0],
                                                  [0, 2, 1, 0, .5, .5, 1, 0]], np.float32))
    # the second dog has only a quarter of its area inside the window
    emit = "crop_size: 8 emit_constraint { emit_type: MIN_OVERLAP emit_overlap: 0.5 }"
    source = build_data_source(annotated_layer("b.txt", 1, emit), dataset)
    rows = source.batch(0)["label"].numpy().reshape(-1, 8)
    np.testing.assert_array_equal(rows, np.array([[0, 2, 0, 0, 0, 1, 1, 0]], np.float32))


def test_list_root_folder_and_errors(dataset):
    (dataset / "sub").mkdir()
    (dataset / "sub/list.txt").write_text("img/a.png xml/a.xml\n")
    layer = annotated_layer("sub/list.txt", 1, WARP,
                            f'image_data_param {{ root_folder: "{dataset}/" }}')
    rows = build_data_source(layer, dataset).batch(0)["label"].numpy().reshape(-1, 8)
    assert rows.shape == (3, 8)
    # without root_folder: the list's folder, then the prototxt's folder (here sub/ too)
    (dataset / "sub/labelmap.prototxt").write_text(LABELMAP)
    with pytest.raises(LayerError, match="img/a.png not found"):
        build_data_source(annotated_layer("list.txt", 1, WARP), dataset / "sub").batch(0)
    layer = annotated_layer("list.txt")
    layer.annotated_data_param.ClearField("label_map_file")
    with pytest.raises(LayerError, match="label_map_file"):
        build_data_source(layer, dataset)
    layer = annotated_layer("list.txt")
    layer.annotated_data_param.batch_sampler[0].sampler.min_scale = 0.3
    with pytest.raises(LayerError, match="batch_sampler"):
        build_data_source(layer, dataset)
    (dataset / "xml/a.xml").write_text(voc_xml(40, 20, [("cat", 0, ("1.5", 1, 2, 2), False)]))
    with pytest.raises(LayerError, match="not an integer"):
        build_data_source(annotated_layer("list.txt", 1), dataset).batch(0)


# --- MobileNet-SSD's test prototxt on faces --------------------------------------------------

BATCH = 2

@pytest.mark.slow
def test_mobilenet_ssd_test_prototxt_runs_on_make_annoset_lmdb(shared, tmp_path):
    import xml.etree.ElementTree as ET

    from calibrator.caffe.netstate import filter_net
    from calibrator.caffe.prototxt import read_net
    from calibrator.detection.map import DetectionAccumulator
    from calibrator.graph.net import CaffeNet
    from tests.netutil import random_weights

    faces = shared / "data/faces-pseudo"
    lines = (faces / "list.txt").read_text().splitlines()[:3]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "labelmap.prototxt").write_text(
        'item { name: "background" label: 0 } item { name: "face" label: 1 }')
    write_annoset(tmp_path / "list.txt", tmp_path / "test_lmdb", tmp_path / "labelmap.prototxt",
                  root=faces)
    net_param = filter_net(read_net(
        shared / "models/zoo/chuanqi305_mobilenet_ssd/MobileNetSSD_test.prototxt"))
    data = net_param.layer[0]
    assert data.type == "AnnotatedData"
    data.data_param.source = str(tmp_path / "test_lmdb")
    data.annotated_data_param.label_map_file = str(tmp_path / "labelmap.prototxt")
    # with random weights (and on the zeros shape inference runs) every prior passes the
    # 0.01 threshold of every class: NMS over 20 x 400 candidates per image is slow, so 2
    # images per batch instead of 8
    data.data_param.batch_size = BATCH
    source = build_data_source(data, tmp_path)
    shapes = source.top_shapes()
    assert shapes["data"] == (BATCH, 3, 300, 300)
    net = CaffeNet(net_param, random_weights(net_param, shapes), shapes)
    assert net.output_names == ["detection_eval"]
    feeds = source.batch(0)
    with torch.no_grad():
        out = net(feeds)["detection_eval"].numpy()
    rows = out.reshape(-1, 5)
    # one row per class 1..20, then one per detection (evaluate_difficult_gt: false)
    positives = sum(o.find("difficult").text.strip() == "0"
                    for line in lines[:BATCH]
                    for o in ET.parse(faces / line.split()[1]).getroot().findall("object"))
    header = np.array([[-1, c, positives if c == 1 else 0, -1, -1] for c in range(1, 21)])
    np.testing.assert_array_equal(rows[:20], header)
    assert out.shape[2] > 20 and set(np.unique(rows[20:, 0])) <= set(range(BATCH))
    assert np.all((rows[20:, 3] + rows[20:, 4]) <= 1)
    label = feeds["label"].numpy().reshape(-1, 8)
    assert label.shape[0] == sum(len(ET.parse(faces / line.split()[1]).getroot()
                                     .findall("object")) for line in lines[:BATCH])
    acc = DetectionAccumulator()
    acc.add(out)
    assert 0.0 <= acc.mean_ap() <= 1.0 / 20  # only class 1 has boxes: at most 1/20
