"""32x32 FFCV loaders with mixing for Fashion-MNIST as written by ``mixpipe data prepare``.

``OUT/train.beton`` and ``OUT/val.beton`` hold 28x28 grey items padded to 32x32 RGB JPEGs, ids in
dataset order. Training crops each constituent mildly (35-100% of the area) to its region of the
32x32 composite (splits on an 8 px grid, the total stride of small-image ResNets), mirrors and
normalises; validation centre-crops the whole image (ratio 1) and normalises.

From Python::

    from pipelines.ffcv_small import train, val
    loader = train("data/fashion-mnist/train.beton", 256, service)

From the command line::

    python pipelines/ffcv_small.py --data data/fashion-mnist --batches 50 --mix 0.5
"""
from __future__ import annotations

import sys

from mixpipe.ffcv.presets import FFCVSettings, cli_main, train_loader, val_loader

#: the same statistics and crop as the DALI small pipeline (grey images: equal per channel)
SETTINGS = FFCVSettings(size=(32, 32), stride=8, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3),
                        flip_prob=0.5, mean=(72.9, 72.9, 72.9), std=(90.0, 90.0, 90.0),
                        val_ratio=1.0)


def train(beton: str, batch_size: int = 256, plans=None, **kwargs):
    """Mixing :class:`mixpipe.ffcv.MixLoader` (``plans``: a SelectionService or client)."""
    return train_loader(beton, SETTINGS, batch_size, plans, **kwargs)


def val(beton: str, batch_size: int = 256, **kwargs):
    """Unmixed :class:`mixpipe.ffcv.MixLoader` over the validation .beton."""
    return val_loader(beton, SETTINGS, batch_size, **kwargs)


if __name__ == "__main__":
    sys.exit(cli_main(SETTINGS, __doc__.splitlines()[0]))
