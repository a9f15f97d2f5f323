"""224 px FFCV loaders with mixing for an ImageNet-style class-folder tree.

Write the .beton once from the tree laid out by ``mixpipe data prepare`` (or any tree with a
``<split>_files.txt``; images are shrunk so the longer side is at most 512 px, the FFCV ImageNet
recipe), then train with random resized crops per constituent (stride 32: ResNet's grid at 224)
and validate unmixed with a 224/256 centre crop.

From Python::

    from pipelines.ffcv_imagenet import write_beton, train, val
    write_beton("data/imagenet", "train")           # -> data/imagenet/train.beton
    loader = train("data/imagenet/train.beton", 256, service)
    for batch in loader: ...                        # mixpipe.core.batch.MixedBatch

From the command line::

    python pipelines/ffcv_imagenet.py --data data/imagenet --write-beton --batches 20 --mix 0.5
"""
from __future__ import annotations

import os
import sys

from mixpipe.ffcv.presets import FFCVSettings, cli_main, train_loader, val_loader, \
    write_beton_from_tree

#: resize="fast" (FFCV's OpenCV resize of each crop) is the default here: at 224 px on varied-size
#: JPEGs the exact "reference" resize (equal to the core composer, which the tests keep using)
#: cost 1.41-1.98x the host CPU per source image of FFCV's plain pipeline, "fast" 0.74-0.85x
#: (benchmarks/results/overhead/overhead_ffcv*.json).
SETTINGS = FFCVSettings(size=(224, 224), stride=32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        flip_prob=0.5, mean=(123.675, 116.28, 103.53),
                        std=(58.395, 57.12, 57.375), val_ratio=224 / 256, resize="fast")


def write_beton(tree: str, split: str = "train", max_side: int = 512, workers: int = 1) -> str:
    """``TREE/<split>.beton`` from ``TREE/<split>_files.txt`` (sample ids in file order)."""
    return write_beton_from_tree(tree, split, os.path.join(tree, f"{split}.beton"), max_side,
                                 workers=workers)


def train(beton: str, batch_size: int = 256, plans=None, **kwargs):
    """Mixing :class:`mixpipe.ffcv.MixLoader` (``plans``: a SelectionService or client)."""
    return train_loader(beton, SETTINGS, batch_size, plans, **kwargs)


def val(beton: str, batch_size: int = 256, **kwargs):
    """Unmixed centre-crop :class:`mixpipe.ffcv.MixLoader`."""
    return val_loader(beton, SETTINGS, batch_size, **kwargs)


if __name__ == "__main__":
    sys.exit(cli_main(SETTINGS, __doc__.splitlines()[0], write_tree=True))
