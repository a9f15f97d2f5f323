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

from mixpipe.dali.pipeline import (PipelineSettings, cli_main, file_list_args,
                                   make_train_loader, val_pipeline)

#: Fashion-MNIST statistics of the padded 32x32 RGB images (grey, so equal per channel).
SETTINGS = PipelineSettings(size=(32, 32), stride=8, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3),
                            flip=True, mean=(72.9, 72.9, 72.9), std=(90.0, 90.0, 90.0),
                            val_resize_shorter=32)


def train_loader(data: str, batch_size: int = 256, plans=None, device_id=0, **kwargs):
    """:class:`mixpipe.dali.MixIterator` over the training split (see ``make_train_loader``)."""
    return make_train_loader(data, SETTINGS, batch_size, plans, device_id, **kwargs)


def val(data: str, batch_size: int = 256, device_id=0, **kwargs):
    """The validation pipeline (outputs ``images, labels``) over ``OUT/val_files.txt``."""
    root, file_list = file_list_args(data, "val")
    return val_pipeline(root, file_list, SETTINGS, batch_size, device_id, **kwargs)


if __name__ == "__main__":
    sys.exit(cli_main(SETTINGS, __doc__.splitlines()[0]))
