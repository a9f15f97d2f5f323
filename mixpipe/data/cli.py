"""``mixpipe data prepare {fashion-mnist,tree}``: write a dataset in the layout the loaders read.

Examples::

    mixpipe data prepare fashion-mnist --out data/fashion-mnist
    mixpipe data prepare fashion-mnist --out /tmp/fm --limit 2000 --no-beton
    mixpipe data prepare tree --src /datasets/imagenet --out data/imagenet --beton --max-side 512

Re-running is cheap: complete artifacts are skipped, interrupted ones rebuilt.
"""
from __future__ import annotations

import argparse
import sys

from .errors import DataError
from .fashion_mnist import DEFAULT_ROOT

__all__ = ["add_arguments", "run"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--quality", type=int, default=95,
                   help="JPEG quality 1..100 for written JPEGs and the .beton (default 95)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: all CPU cores)")
    p.add_argument("--verify", action="store_true",
                   help="hash every large artifact to check it (default: sizes and headers)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Write a dataset in the layout the mixpipe loaders read: a JPEG tree, "
                          "file lists, arrays and FFCV .beton files. Re-running skips complete "
                          "artifacts and rebuilds interrupted ones.")
    sources = parser.add_subparsers(dest="source", metavar="SOURCE")
    sources.required = True
    fm = sources.add_parser("fashion-mnist", help="Fashion-MNIST from the Debian package "
                            "dataset-fashion-mnist (train 60k, val = the 10k test set)")
    fm.add_argument("--src", default=DEFAULT_ROOT,
                    help=f"folder with the four *-ubyte.gz files (default {DEFAULT_ROOT})")
    fm.add_argument("--limit", type=int, default=None,
                    help="keep only the first N samples of each split")
    fm.add_argument("--val-limit", type=int, default=None,
                    help="keep only the first N val samples (default: --limit)")
    fm.add_argument("--no-beton", dest="beton", action="store_false",
                    help="skip the FFCV .beton files")
    _common(fm)
    tree = sources.add_parser("tree", help="a class-folder tree SRC/{train,val}/<class>/<image> "
                              "(ImageNet layout); images are linked, not copied")
    tree.add_argument("--src", required=True, help="root of the class-folder tree")
    tree.add_argument("--beton", action="store_true", help="also write FFCV .beton files")
    tree.add_argument("--max-side", type=int, default=None,
                      help="in the .beton, shrink images so the longer side is at most this")
    tree.add_argument("--arrays", action="store_true",
                      help="also write <split>_arrays.npz (decodes every image into memory)")
    tree.add_argument("--array-size", type=int, default=None,
                      help="resize every image to SxS for the arrays (needed if sizes differ)")
    tree.add_argument("--on-bad", choices=("fail", "skip"), default="fail",
                      help="files that do not decode: fail naming them (default), or skip them;"
                           " both list them in OUT/<split>_bad.txt")
    tree.add_argument("--allow-empty-classes", action="store_true",
                      help="keep class folders without images as classes (default: an error)")
    _common(tree)


def run(args: argparse.Namespace) -> int:
    from .prepare import prepare_fashion_mnist, prepare_tree

    try:
        if args.source == "fashion-mnist":
            paths = prepare_fashion_mnist(args.out, args.limit, args.beton, args.quality,
                                          src=args.src, val_limit=args.val_limit,
                                          workers=args.workers, verify=args.verify)
        else:
            paths = prepare_tree(args.src, args.out, beton=args.beton, max_side=args.max_side,
                                 quality=args.quality, arrays=args.arrays,
                                 array_size=args.array_size, workers=args.workers,
                                 verify=args.verify, on_bad=args.on_bad,
                                 allow_empty_classes=args.allow_empty_classes)
    except DataError as err:
        print(f"mixpipe data prepare: error: {err}", file=sys.stderr)
        return 2
    width = max(len(k) for k in paths)
    for key, path in paths.items():
        print(f"  {key:<{width}}  {path}")
    return 0
