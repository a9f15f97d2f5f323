"""Where the Localized→SGD boundary sits each epoch, and how fast the local layers learn.

Pure rules (numbers in, numbers out) so they can be checked on synthetic sequences; the
:class:`~mixpipe.train.local.LocalSGD` wrapper feeds them. The transition index ``t`` names the
first block trained by SGD: blocks ``[0, t)`` learn locally, ``t = 0`` is plain SGD.

* Static (after the paper's scheduler function): ``t = schedule(epoch)``, any function of the
  epoch; :meth:`StaticTransition.linear` is the ramp we use by default.
* Dynamic (our design after the paper's idea of watching the weight updates of the transition
  layer across epochs): each epoch, the transition block's relative update
  ``r = ‖W_end − W_start‖ / ‖W_start‖`` (optionally divided by the epoch's mean learning-rate
  factor, so a decaying schedule alone does not look like convergence) is recorded; once
  ``window`` epochs are on record at this position, the block is *settled* when every one of the
  last ``window`` values is below ``threshold`` or when ``r`` stopped falling: the drop from the
  first to the last of the window is less than ``min_drop`` of the first. A settled block turns
  local and the boundary moves one block deeper; its record starts afresh at the new position, so
  the boundary moves at most once per ``window`` epochs and never back.
* Weak supervision (our design after the paper's idea of steering the local rate by the overall
  training loss): after each loss observation ``L_k`` (an epoch's mean training loss from
  ``fit``, or any window's mean in a custom loop) the multiplier on the local rate becomes
  ``m ← clip(m · clip(L_{k−1} / L_k, down, up), floor, ceiling)``: a rising loss (the local layers
  may be hurting) slows local learning at once, a falling loss lets it recover up to the ceiling.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Callable, Optional, Sequence

__all__ = ["StaticTransition", "DynamicTransition", "WeakSupervision", "settled",
           "next_multiplier"]


def _need(cond: bool, owner: str, field: str, value, allowed: str) -> None:
    if not cond:
        raise ValueError(f"{owner}.{field} must be {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class StaticTransition:
    """schedule: epoch -> transition index (clipped by the wrapper to [0, max_transition])."""

    schedule: Callable[[int], int]

    def __post_init__(self) -> None:
        _need(callable(self.schedule), "StaticTransition", "schedule", self.schedule,
              "a callable epoch -> index")

    def __call__(self, epoch: int) -> int:
        value = self.schedule(int(epoch))
        try:
            if isinstance(value, bool):
                raise TypeError
            return operator.index(value)
        except TypeError:
            raise TypeError(f"StaticTransition.schedule({epoch}) returned {value!r}, not an "
                            "int") from None

    @classmethod
    def linear(cls, epochs: int, max_transition: int, start_epoch: int = 1,
               end_fraction: float = 0.75) -> "StaticTransition":
        """0 before ``start_epoch``, then a linear ramp that reaches ``max_transition`` at epoch
        ``ceil(end_fraction * epochs)`` and stays there (all layers start with SGD, as in the
        paper, and the deepest boundary holds for the last quarter by default)."""
        _need(isinstance(epochs, int) and epochs >= 1, "StaticTransition.linear", "epochs",
              epochs, "an int >= 1")
        _need(isinstance(max_transition, int) and max_transition >= 0, "StaticTransition.linear",
              "max_transition", max_transition, "an int >= 0")
        _need(isinstance(start_epoch, int) and start_epoch >= 0, "StaticTransition.linear",
              "start_epoch", start_epoch, "an int >= 0")
        _need(0.0 < end_fraction <= 1.0, "StaticTransition.linear", "end_fraction",
              end_fraction, "in (0, 1]")
        end = max(start_epoch, int(math.ceil(end_fraction * epochs)))

        def ramp(epoch: int) -> int:
            if epoch < start_epoch:
                return 0
            if epoch >= end:
                return max_transition
            span = end - start_epoch + 1
            return min(max_transition, (epoch - start_epoch + 1) * max_transition // span)

        return cls(ramp)


@dataclasses.dataclass(frozen=True)
class DynamicTransition:
    """window: epochs on record at a position before it may move (>= 1); threshold: relative
    update per epoch below which a block counts as settled (>= 0); min_drop: the relative fall
    over the window below which updates have stopped decreasing, in [0, 1) (0 disables that
    test); normalise_by_lr: divide r by the epoch's mean learning-rate factor.

    Defaults from a pilot on Fashion-MNIST (resnet-tiny, 6 cosine epochs): the stem's relative
    update per epoch fell 0.58, 0.26, 0.12, 0.08, 0.04, so 0.15 lets it turn local once two
    epochs in a row changed it by less than 15%. Dividing by the learning-rate factor flattened
    that sequence but blew up as a cosine schedule neared zero, hence off by default."""

    window: int = 2
    threshold: float = 0.15
    min_drop: float = 0.1
    normalise_by_lr: bool = False

    def __post_init__(self) -> None:
        _need(isinstance(self.window, int) and self.window >= 1, "DynamicTransition", "window",
              self.window, "an int >= 1")
        _need(self.threshold >= 0 and math.isfinite(self.threshold), "DynamicTransition",
              "threshold", self.threshold, "a finite number >= 0")
        _need(0.0 <= self.min_drop < 1.0, "DynamicTransition", "min_drop", self.min_drop,
              "in [0, 1)")


def settled(norms: Sequence[float], settings: DynamicTransition) -> bool:
    """True when the update norms recorded at the current position say: move deeper."""
    if len(norms) < settings.window:
        return False
    recent = [float(v) for v in norms[-settings.window:]]
    if not all(math.isfinite(v) for v in recent):
        return False
    if max(recent) < settings.threshold:
        return True
    if settings.window >= 2 and settings.min_drop > 0 and recent[0] > 0:
        return (recent[0] - recent[-1]) / recent[0] < settings.min_drop
    return False


@dataclasses.dataclass(frozen=True)
class WeakSupervision:
    """down/up: bounds on the per-observation factor L_{k-1}/L_k (0 < down <= 1 <= up);
    floor/ceiling: bounds on the multiplier itself (0 <= floor <= ceiling); enabled: False keeps
    the multiplier at 1."""

    down: float = 0.5
    up: float = 1.25
    floor: float = 0.05
    ceiling: float = 1.0
    enabled: bool = True

    def __post_init__(self) -> None:
        _need(0.0 < self.down <= 1.0, "WeakSupervision", "down", self.down, "in (0, 1]")
        _need(1.0 <= self.up and math.isfinite(self.up), "WeakSupervision", "up", self.up,
              "a finite number >= 1")
        _need(0.0 <= self.floor <= self.ceiling, "WeakSupervision", "floor", self.floor,
              f"in [0, ceiling={self.ceiling}]")
        _need(math.isfinite(self.ceiling), "WeakSupervision", "ceiling", self.ceiling,
              "finite")


def next_multiplier(multiplier: float, previous_loss: Optional[float], loss: float,
                    settings: WeakSupervision) -> float:
    """The local-rate multiplier after observing ``loss`` (see the module docstring)."""
    if not settings.enabled:
        return 1.0
    if previous_loss is None or not (math.isfinite(previous_loss) and math.isfinite(loss)) \
            or loss <= 0 or previous_loss <= 0:
        return multiplier if math.isfinite(loss) else max(settings.floor,
                                                           multiplier * settings.down)
    factor = min(max(previous_loss / loss, settings.down), settings.up)
    return min(max(multiplier * factor, settings.floor), settings.ceiling)
