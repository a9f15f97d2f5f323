"""FFCV adapter: a plan-driven loader and decoders that compose mixed inputs in compiled code.

Typical use::

    from mixpipe.ffcv import MixLoader, RandomResizedCropMixDecoder, MixLabelDecoder
    loader = MixLoader("train.beton", 256, service, pipelines={
        "image": [RandomResizedCropMixDecoder((224, 224), stride=32), ToTensor(), ...],
        "label": [MixLabelDecoder(), ToTensor()]})
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:              # MixedBatch
            ...

Importing this package needs ffcv (``pip install mixpipe[ffcv]``).
"""
from ..extras import require as _require

_require("ffcv")  # a missing FFCV says how to install it
from .decoders import (CenterCropMixDecoder, MixImageDecoder, MixLabelDecoder,
                       RandomResizedCropMixDecoder, SimpleMixDecoder, unpack_labels)
from .loader import MixLoader
from .tables import PlanTables

__all__ = ["MixLoader", "PlanTables",
           "MixImageDecoder", "SimpleMixDecoder", "RandomResizedCropMixDecoder",
           "CenterCropMixDecoder", "MixLabelDecoder", "unpack_labels"]
