"""ImageNet-style DALI training and validation pipelines with mixing.

Train: file list (``OUT/train_files.txt`` from ``mixpipe data prepare``, or a class-folder tree),
per-constituent ROI random-resized-crop decode (``device="mixed"`` on a GPU) straight to the
constituent's region of the 224x224 composite, random mirror, mix, normalise, NCHW float.
Validation: decode, resize the shorter side to 256, centre crop 224, normalise.

From Python::

    from pipelines.dali_imagenet import SETTINGS, train_loader
    loader = train_loader("/data/imagenet-prepared", batch_size=256, plans=service)
    for epoch in range(90):
        loader.set_epoch(epoch)
        for batch in loader: ...        # mixpipe.core.batch.MixedBatch

From the command line (runs N batches and prints throughput)::

    python pipelines/dali_imagenet.py --data OUT --batches 100 --mix 0.5
    python pipelines/dali_imagenet.py --data OUT --cpu --workers 2 --batch-size 16 --batches 10
"""
from __future__ import annotations

import sys

from mixpipe.dali.pipeline import (PipelineSettings, cli_main, file_list_args,
                                   make_train_loader, val_pipeline)

#: ResNet-50 at 224 px: total stride 32, so a 7x7 grid of split positions.
SETTINGS = PipelineSettings(size=(224, 224), stride=32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                            flip=True, val_resize_shorter=256)


def train_loader(data: str, batch_size: int = 256, plans=None, device_id=0, **kwargs):
    """:class:`mixpipe.dali.MixIterator` over the training split (see ``make_train_loader``)."""
    return make_train_loader(data, SETTINGS, batch_size, plans, device_id, **kwargs)


def val(data: str, batch_size: int = 256, device_id=0, **kwargs):
    """The validation pipeline (outputs ``images, labels``) over ``OUT/val_files.txt``."""
    root, file_list = file_list_args(data, "val")
    return val_pipeline(root, file_list, SETTINGS, batch_size, device_id, **kwargs)


if __name__ == "__main__":
    sys.exit(cli_main(SETTINGS, __doc__.splitlines()[0]))
