"""``calibrator make-annoset``: Caffe-SSD's ``create_annoset`` (VOC XML labels) -> an LMDB of
AnnotatedDatum that an AnnotatedData layer (ours or Caffe-SSD's) reads."""

from __future__ import annotations

import argparse
from pathlib import Path

from calibrator.cli.parsing import EXIT_CODES
from calibrator.detection.annoset import read_annoset_list, write_annoset
from calibrator.outputs import OutputPlan, check_replaced_folder


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "make-annoset", help="write an AnnotatedData LMDB from an image/XML list, as "
                             "create_annoset",
        description="Write an LMDB of AnnotatedDatum records from a list of 'IMAGE XML' lines "
                    "(Pascal VOC XML boxes, names mapped to labels by a Caffe-SSD label map), "
                    "as Caffe-SSD's create_annoset does: keys %%08d_<IMAGE>, the image file's "
                    "own bytes (encoded), boxes normalised by the XML <size>, difficult flags "
                    "kept. The LMDB is written beside OUT_DB and renamed into place when "
                    "complete.")
    parser.epilog = EXIT_CODES
    parser.add_argument("list", metavar="LIST", help="text file of 'IMAGE XML' lines")
    parser.add_argument("out", metavar="OUT_DB", help="the LMDB folder to create")
    parser.add_argument("--labelmap", "--label-map-file", required=True, metavar="PROTOTXT",
                        help="Caffe-SSD LabelMap (item { name label }) for the XML <name>s")
    parser.add_argument("--root", metavar="DIR",
                        help="folder the list's paths are relative to (default: the list's "
                             "folder)")
    parser.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"),
                        help="store the images resized to H x W (bilinear) and re-encoded "
                             "(default: the original bytes)")
    parser.add_argument("--encode-type", metavar="EXT",
                        help="re-encode images whose file type differs (jpg, png); default: "
                             "keep each file's type")
    parser.add_argument("--gray", action="store_true",
                        help="decode as grayscale when re-encoding (create_annoset --gray)")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT_DB")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    outputs = OutputPlan()
    outputs.folder("OUT_DB", args.out)
    outputs.check([args.list, args.labelmap])
    root = Path(args.root) if args.root else Path(args.list).parent
    inputs = [args.list, args.labelmap]
    for image, label_file, _ in read_annoset_list(args.list):
        inputs += [root / image, root / label_file]
    check_replaced_folder("OUT_DB", args.out, inputs)
    summary = write_annoset(args.list, args.out, args.labelmap, root=args.root,
                            resize=tuple(args.resize) if args.resize else (0, 0),
                            encode_type=args.encode_type, is_color=not args.gray,
                            force=args.force)
    for line in summary.lines():
        print(line)
    return 0
