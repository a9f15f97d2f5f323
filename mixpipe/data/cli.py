"""``mixpipe data prepare {fashion-mnist,cifar10,tree}``: write a dataset in the layout the
loaders read.

Examples::

    mixpipe data prepare fashion-mnist --out data/fashion-mnist
    mixpipe data prepare fashion-mnist --out /tmp/fm --limit 2000 --no-beton
    mixpipe data prepare cifar10 --src ~/.cache/torchvision/cifar-10-batches-py --out data/cifar10
    mixpipe data prepare tree --src /datasets/imagenet --out data/imagenet --beton --max-side 512

Re-running is cheap: complete artifacts are skipped, interrupted ones rebuilt.
"""
from __future__ import annotations

import argparse
import sys

from .errors import DataError
from .fashion_mnist import DEFAULT_ROOT
from .holdout import DEFAULT_FRACTION, DEFAULT_SEED

__all__ = ["add_arguments", "run"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--quality", type=int, default=95,
                   help="JPEG quality 1..100 for written JPEGs and the .beton (default 95)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: all CPU cores)")
    p.add_argument("--holdout", type=float, default=DEFAULT_FRACTION,
                   help="share of the training split held out, stratified and seeded, as the "
                        "'val' split where settings are chosen (default %(default)s; 0: none)")
    p.add_argument("--holdout-seed", type=int, default=DEFAULT_SEED,
                   help="seed of the hold-out (default %(default)s)")
    p.add_argument("--verify", action="store_true",
                   help="hash every large artifact to check it (default: sizes and headers)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Write a dataset in the layout the mixpipe loaders read: a JPEG tree, "
                          "file lists, arrays and FFCV .beton files. Re-running skips complete "
                          "artifacts and rebuilds interrupted ones.")
    sources = parser.add_subparsers(dest="source", metavar="SOURCE")
    sources.required = True
    fm = sources.add_parser("fashion-mnist", help="Fashion-MNIST from the Debian package "
                            "dataset-fashion-mnist (train 54k, val 6k held out of train, test = the 10k test set)")
    fm.add_argument("--src", default=DEFAULT_ROOT,
                    help=f"folder with the four *-ubyte.gz files (default {DEFAULT_ROOT})")
    fm.add_argument("--limit", type=int, default=None,
                    help="keep only the first N training images (before the hold-out) and the "
                         "first N test images")
    fm.add_argument("--test-limit", type=int, default=None,
                    help="keep only the first N test images (default: --limit)")
    fm.add_argument("--no-beton", dest="beton", action="store_false",
                    help="skip the FFCV .beton files")
    _common(fm)
    c10 = sources.add_parser("cifar10", help="CIFAR-10 from a copy you have: torchvision's "
                             "cifar-10-batches-py folder (train 45k, val 5k held out of train, "
                             "test = the 10k test batch), or a class-folder tree "
                             "SRC/{train,test}/<class>/<image> (prepared as `tree` does, with "
                             "arrays); nothing is downloaded")
    c10.add_argument("--src", required=True,
                     help="the cifar-10-batches-py folder (data_batch_1..5, test_batch, "
                          "batches.meta) or the root above it, or a class-folder tree")
    c10.add_argument("--no-beton", dest="beton", action="store_false",
                     help="skip the FFCV .beton files")
    _common(c10)
    tree = sources.add_parser("tree", help="a class-folder tree SRC/{train,val|test}/<class>/"
                              "<image> (ImageNet layout; SRC/val or SRC/test becomes the test "
                              "split); images are linked, not copied")
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
    from .cifar10 import prepare_cifar10
    from .prepare import prepare_fashion_mnist, prepare_tree

    try:
        if args.source == "cifar10":
            paths = prepare_cifar10(args.src, args.out, beton=args.beton, quality=args.quality,
                                    holdout=args.holdout, holdout_seed=args.holdout_seed,
                                    workers=args.workers, verify=args.verify)
        elif args.source == "fashion-mnist":
            paths = prepare_fashion_mnist(args.out, args.limit, args.beton, args.quality,
                                          src=args.src, test_limit=args.test_limit,
                                          holdout=args.holdout, holdout_seed=args.holdout_seed,
                                          workers=args.workers, verify=args.verify)
        else:
            paths = prepare_tree(args.src, args.out, beton=args.beton, max_side=args.max_side,
                                 quality=args.quality, arrays=args.arrays,
                                 array_size=args.array_size, holdout=args.holdout,
                                 holdout_seed=args.holdout_seed, workers=args.workers,
                                 verify=args.verify, on_bad=args.on_bad,
                                 allow_empty_classes=args.allow_empty_classes)
    except DataError as err:
        print(f"mixpipe data prepare: error: {err}", file=sys.stderr)
        return 2
    width = max(len(k) for k in paths)
    for key, path in paths.items():
        print(f"  {key:<{width}}  {path}")
    return 0
