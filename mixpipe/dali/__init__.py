"""mixpipe for NVIDIA DALI: a plan-driven source, mixing graph functions, a batch iterator.

A complete script over your own class folders (``ROOT/<class>/<image>``, what
``fn.readers.file(file_root=ROOT)`` reads; ``file_list=`` works the same way), no prepare step.
It runs as written on a CPU-only DALI; on a GPU pass ``device_id=0`` and ``device="mixed"``::

    import sys

    from nvidia.dali import fn, pipeline_def, types

    from mixpipe import dali as mxd
    from mixpipe.server import InProcessService


    @pipeline_def(enable_conditionals=True, py_num_workers=2, py_start_method="spawn")
    def train(source, device):
        inputs = mxd.plan_inputs(source)                 # parallel batch source
        images = mxd.mix(inputs, device=device)          # decode, view, compose
        # Normalise WITHOUT mirror=: every constituent is already mirrored inside its own
        # region, and mirroring the composite would swap its regions against the labels
        # (MixIterator refuses such a pipeline).
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[124.0, 116.0, 104.0], std=[58.0, 57.0, 57.0])
        return (images, inputs.targets, inputs.weights, inputs.ids, inputs.layout,
                inputs.loss_scale)


    if __name__ == "__main__":  # "spawn" workers re-import this file: build nothing above
        board = mxd.PlanBoard.temporary()
        source = mxd.SlotSource.from_files(board, (64, 64), stride=16, file_root=sys.argv[1])
        service = InProcessService(len(source.images), {"policy": "random", "fraction": 0.5,
                                                        "layout": "halves", "grid_cells": 4})
        pipe = train(source, "cpu", batch_size=8, num_threads=2, device_id=None)
        with mxd.MixIterator(pipe, source, service) as loader:
            for epoch in range(2):
                loader.set_epoch(epoch)
                for batch in loader:                     # mixpipe.core.batch.MixedBatch
                    pass                                 # train; report losses to the service
        print("ok", tuple(batch.image.shape))

See ``pipelines/dali_imagenet.py`` for the complete ImageNet recipe, and
:class:`ValBatches` for validation batches (resize, centre crop) over the same files.
"""
from ..extras import require as _require

_require("nvidia.dali")  # a missing DALI says: pip install 'mixpipe[dali]'

from ..core.source import FixedPlans  # noqa: E402
from .evaluate import ValBatches  # noqa: E402
from .files import (EncodedImages, FileList, InMemoryImages, ListedFiles, open_files,  # noqa: E402
                    read_file_list)
from .iterator import OUTPUT_NAMES, MixIterator, close_pipeline  # noqa: E402
from .ops import (Constituent, MixInputs, compose, constituent_bytes,  # noqa: E402
                  constituent_geometry, decode_view, mix, plan_inputs)
from .plans import PlanBoard, PlanNotPublished, epoch_walk  # noqa: E402
from .source import (CONSTITUENT_FIELDS, SLOT_FIELDS, FixedView, RandomView,  # noqa: E402
                     SlotBatches, SlotSource, image_size, output_names)

__all__ = ["EncodedImages", "FileList", "InMemoryImages", "ListedFiles", "read_file_list",
           "OUTPUT_NAMES", "FixedPlans", "MixIterator", "close_pipeline", "MixInputs", "compose",
           "decode_view", "mix", "plan_inputs", "PlanBoard", "PlanNotPublished", "epoch_walk",
           "FixedView", "SlotSource", "RandomView", "image_size", "constituent_bytes",
           "constituent_geometry", "Constituent", "SLOT_FIELDS", "CONSTITUENT_FIELDS",
           "SlotBatches", "output_names", "open_files", "ValBatches"]
