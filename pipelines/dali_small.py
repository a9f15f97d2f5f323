"""32x32 DALI pipelines with mixing, for Fashion-MNIST as written by ``mixpipe data prepare``.

The prepared images are 28x28 grey digits padded to 32x32 RGB JPEGs. Training crops each
constituent with a mild random resized crop (area 35-100%) to its region of the 32x32 composite
(splits on an 8 px grid: the total stride of the small-image ResNets), mirrors, mixes and
normalises; validation only decodes and normalises.

From Python::

    from pipelines.dali_small import train_loader
    loader = train_loader("data/fashion-mnist", batch_size=256, plans=service, device_id=None)

From the command line::

    python pipelines/dali_small.py --data data/fashion-mnist --cpu --batches 50 --mix 0.5
"""
from __future__ import annotations

import sys

from mixpipe.dali.pipeline import PipelineSettings, Preset, cli_main

#: Fashion-MNIST statistics of the padded 32x32 RGB images (grey, so equal per channel).
SETTINGS = PipelineSettings(size=(32, 32), stride=8, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3),
                            flip=True, mean=(72.9, 72.9, 72.9), std=(90.0, 90.0, 90.0),
                            val_resize_shorter=32)


PRESET = Preset(SETTINGS)
train_loader = PRESET.train_loader
val = PRESET.val


if __name__ == "__main__":
    sys.exit(PRESET.main(__doc__.splitlines()[0]))
