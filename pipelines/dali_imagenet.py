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

from mixpipe.dali.pipeline import PipelineSettings, Preset, cli_main

#: ResNet-50 at 224 px: total stride 32, so a 7x7 grid of split positions.
SETTINGS = PipelineSettings(size=(224, 224), stride=32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                            flip=True, val_resize_shorter=256)


#: The plan source runs in the pipeline's own process (py_num_workers=0): it makes a whole batch
#: per call, which is small next to a 224 px decode, and worker processes cost more host CPU than
#: they save. At 224 px on varied-size JPEGs (CPU-only DALI) the mixing pipeline took 1.04x /
#: 0.93x / 0.86x the CPU-seconds per source image of the plain DALI pipeline at 0 / 50 / 90 %
#: mixed this way, and 1.26x / 1.08x / 1.01x with 2 worker processes
#: (benchmarks/results/overhead/dali-varied.json, dali-varied-workers2.json). Pass
#: py_num_workers=N to train_loader for worker processes (they overlap the source with training).
PRESET = Preset(SETTINGS, py_num_workers=0)
train_loader = PRESET.train_loader
val = PRESET.val


if __name__ == "__main__":
    sys.exit(PRESET.main(__doc__.splitlines()[0]))
