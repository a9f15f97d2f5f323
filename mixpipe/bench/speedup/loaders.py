"""One loader factory per ``--loader``: each gives :func:`mixpipe.train.fit` an arm's batches
through the one loader protocol (:class:`mixpipe.core.loader.PlanLoader`).

The arms of a comparison differ only in their plan source; every factory feeds the same samples
with the same per-constituent augmentation and value scale, so the loaders are interchangeable.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .settings import SpeedupSettings

__all__ = ["make_loader", "constituent_transform"]


class _Flip:
    """Constituent transform: horizontal flip with probability 1/2 (the composer resizes)."""

    def __call__(self, image: np.ndarray, region: Any, rng: np.random.Generator) -> np.ndarray:
        return image[:, ::-1] if rng.random() < 0.5 else image


def constituent_transform(s: SpeedupSettings) -> Optional[Any]:
    if s.augment == "none":
        return None
    if s.augment == "flip":
        return _Flip()
    from mixpipe.core.augment import RandomResizedCropFlip

    return RandomResizedCropFlip()


def _torch_loader(s: SpeedupSettings, train: Any, service: Any, seed: int, rank: int,
                  world_size: int) -> Any:
    from mixpipe.torch import MixedLoader

    return MixedLoader(train, service, s.batch_size, size=(s.image_size, s.image_size),
                       stride=s.stride, num_workers=s.workers, seed=seed,
                       constituent_transform=constituent_transform(s),
                       persistent_workers=s.workers > 0, rank=rank, world_size=world_size)


def _missing(extra: str, err: ImportError) -> SystemExit:
    return SystemExit(f"--loader {extra}: cannot import it ({err}); install the extra: "
                      f"pip install mixpipe[{extra}]")


def _ffcv_loader(s: SpeedupSettings, train: Any, service: Any, seed: int, rank: int,
                 world_size: int) -> Any:
    try:
        from ffcv.transforms import ToTensor, ToTorchImage

        from mixpipe.ffcv import MixLabelDecoder, MixLoader, SimpleMixDecoder
    except ImportError as err:
        raise _missing("ffcv", err) from err
    from mixpipe.data import find_prepared

    if s.limit is not None and s.limit < len(train.base):
        raise SystemExit("--loader ffcv reads the whole .beton: --limit subsets are "
                         "for the torch and DALI loaders")
    beton = find_prepared(s.prepared_root).path("train", "beton")
    pipelines = {
        "image": [SimpleMixDecoder((s.image_size, s.image_size), stride=s.stride,
                                   flip_prob=0.5 if s.augment != "none" else 0.0),
                  ToTensor(), ToTorchImage(channels_last=s.uses_channels_last())],
        "label": [MixLabelDecoder(), ToTensor()],
    }
    return MixLoader(beton, s.batch_size, service, pipelines=pipelines,
                     num_workers=max(1, s.workers), rank=rank, world_size=world_size)


def _dali_loader(s: SpeedupSettings, train: Any, service: Any, seed: int, rank: int,
                 world_size: int) -> Any:
    try:
        from .dali_arm import speedup_loader
    except ImportError as err:
        raise _missing("dali", err) from err
    return speedup_loader(s, train, service, seed, rank, world_size)


_FACTORIES = {"torch": _torch_loader, "ffcv": _ffcv_loader, "dali": _dali_loader}


def make_loader(s: SpeedupSettings, train: Any, service: Any, seed: int) -> Any:
    """The arm's loader over ``train``, fetching plans from ``service``."""
    from mixpipe.train.distributed import world

    rank, world_size = world()
    return _FACTORIES[s.loader](s, train, service, seed, rank, world_size)
