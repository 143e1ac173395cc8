"""Options shared by several commands."""

from __future__ import annotations

import argparse

from calibrator.model import ImageFolderOptions


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", type=int, default=None, metavar="ID",
                        help="run on CUDA device ID (default: CPU)")


def add_image_folder_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "deploy nets without a data layer",
        "feed an Input blob from a folder of images: cv2.imread (BGR), cv2.resize to the "
        "input size, then (pixel - mean) * norm")
    group.add_argument("--images", metavar="DIR", help="folder of images (sorted by name)")
    group.add_argument("--mean", type=float, nargs=3, metavar=("B", "G", "R"),
                       default=(0.0, 0.0, 0.0), help="per-channel mean (default 0 0 0)")
    group.add_argument("--norm", type=float, default=1.0, metavar="S",
                       help="scale applied after the mean (default 1.0)")
    group.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                       help="resize to H W (default: the Input shape)")
    group.add_argument("--batch-size", type=int, metavar="N",
                       help="batch size for --images (default: the Input shape's batch)")


def image_folder_options(args) -> ImageFolderOptions | None:
    if not getattr(args, "images", None):
        return None
    return ImageFolderOptions(args.images, tuple(args.mean), args.norm,
                              tuple(args.size) if args.size else None, args.batch_size)
