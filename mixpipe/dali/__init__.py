"""mixpipe for NVIDIA DALI: a plan-driven source, mixing graph functions, a batch iterator.

Build a pipeline with ``enable_conditionals=True``::

    from mixpipe import dali as mxd

    board = mxd.PlanBoard.temporary()
    slots = mxd.SlotSource(mxd.FileList.for_split(OUT), board, size=(224, 224), stride=32)

    @pipeline_def(enable_conditionals=True, py_num_workers=4, py_start_method="spawn")
    def train(slots):
        inputs = mxd.plan_inputs(slots)                  # parallel external source
        images = mxd.mix(inputs, device="mixed")         # decode, view, compose on the GPU
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", ...)
        return images, inputs.targets, inputs.weights, inputs.ids, inputs.layout, inputs.loss_scale

    loader = mxd.MixIterator(train(slots, batch_size=256, device_id=0), slots, service)

See ``pipelines/dali_imagenet.py`` for the complete recipe.
"""
from .files import EncodedImages, FileList, InMemoryImages, ListedFiles, read_file_list
from ..core.source import FixedPlans
from .iterator import OUTPUT_NAMES, MixIterator, close_pipeline
from .ops import (MixInputs, compose, constituent_bytes, constituent_geometry, decode_view, mix,
                  plan_inputs)
from .plans import PlanBoard, PlanNotPublished, epoch_walk
from .source import META_FIELDS, FixedView, RandomView, SlotSource, image_size, unpack_meta

__all__ = ["EncodedImages", "FileList", "InMemoryImages", "ListedFiles", "read_file_list",
           "OUTPUT_NAMES", "FixedPlans", "MixIterator", "close_pipeline", "MixInputs", "compose",
           "decode_view", "mix", "plan_inputs", "PlanBoard", "PlanNotPublished", "epoch_walk",
           "FixedView", "SlotSource", "RandomView", "image_size", "constituent_bytes",
           "constituent_geometry", "META_FIELDS", "unpack_meta"]
