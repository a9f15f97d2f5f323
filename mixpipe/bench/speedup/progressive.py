"""The ``progressive`` arm: the plain model with progressive resizing, as long as equal FLOPs buy.

Forward inputs stop measuring compute once inputs differ in size: a 16 px image costs a
convolutional network a quarter of a 32 px one. So this arm is matched in FLOPs, not inputs:
the matched arm (``budget_match``, normally mixtrain) spends its forward inputs times one full-size
pass (:func:`~mixpipe.bench.speedup.compute.pass_flops`); this arm trains as many epochs of data
``L`` (a partial last epoch, as ``budget``'s) as make its own sum of samples times the pass at each
epoch's side equal that, within 1 %.

The side ramps linearly from ``progressive_min`` to the full size between the fractions
``progressive_ramp`` of ``L`` (:class:`mixpipe.train.resolution.ProgressiveResize`), so a longer
run also ramps later. ``L`` is found by bisection: lengthening the run adds samples (the compute
grows continuously) and moves every epoch earlier on the ramp (a side can only drop a stride), so
the compute never jumps up and bisection lands where it crosses the target.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

from mixpipe.core.policies.budget import BudgetSettings, samples_in_epoch, whole_epochs

from .settings import SpeedupSettings, matched_forward_inputs

__all__ = ["ProgressivePlan", "plan_progressive", "progressive_resize", "start_size",
           "TOLERANCE"]

#: how close the arm's FLOPs must come to the matched arm's
TOLERANCE = 0.01
_ITERATIONS = 100


@dataclasses.dataclass(frozen=True)
class ProgressivePlan:
    """The arm's length in epochs of data, and per loop epoch its side, samples and FLOPs."""

    epochs: float
    sizes: Tuple[int, ...]
    samples: Tuple[int, ...]
    epoch_flops: Tuple[float, ...]
    target_flops: float

    @property
    def flops(self) -> float:
        return float(sum(self.epoch_flops))

    def to_dict(self) -> Dict[str, Any]:
        return {"epochs": self.epochs, "sizes": list(self.sizes), "samples": list(self.samples),
                "epoch_flops": list(self.epoch_flops), "flops": self.flops,
                "target_flops": self.target_flops}


def start_size(s: SpeedupSettings) -> int:
    """``progressive_min``, or half the image size snapped down to the stride."""
    from mixpipe.train.resolution import snap_size

    return s.progressive_min if s.progressive_min is not None else \
        snap_size(s.image_size / 2, s.stride)


def progressive_resize(s: SpeedupSettings, length: float) -> Any:
    """The side per epoch of a run of ``length`` epochs of data (the ramp's fractions of it)."""
    from mixpipe.train.resolution import ProgressiveResize

    start, end = s.progressive_ramp
    return ProgressiveResize(start_size(s), s.image_size, (start * length, end * length),
                             s.stride)


def _plan(s: SpeedupSettings, length: float, num_samples: int,
          flops_at: Callable[[int], float], target: float) -> ProgressivePlan:
    resize, budget = progressive_resize(s, length), BudgetSettings(epochs=length)
    epochs = range(whole_epochs(length))
    sizes = tuple(resize.size(e) for e in epochs)
    samples = tuple(samples_in_epoch(budget, num_samples, e) for e in epochs)
    return ProgressivePlan(length, sizes, samples,
                           tuple(n * float(flops_at(r)) for n, r in zip(samples, sizes)), target)


def plan_progressive(s: SpeedupSettings, num_samples: int, num_classes: int,
                     matched_inputs: Optional[float] = None,
                     flops_at: Optional[Callable[[int], float]] = None) -> ProgressivePlan:
    """The arm's run priced to the matched arm's FLOPs. ``matched_inputs``: that arm's measured
    forward inputs (else predicted); ``flops_at(side)``: one pass's FLOPs (default: the model's,
    counted by :func:`~mixpipe.bench.speedup.compute.pass_flops`)."""
    if flops_at is None:
        from .compute import pass_flops

        def flops_at(side: int) -> float:
            return pass_flops(s.model, side, num_classes)

    target = matched_forward_inputs(s, num_samples, matched_inputs) * float(
        flops_at(s.image_size))
    if target <= 0:
        raise ValueError(f"the matched arm {s.budget_match!r} spent no compute; nothing to match")
    # every epoch but a partial last one costs at least a pass at the start size per sample
    lo, hi = 0.0, target / (num_samples * float(flops_at(start_size(s)))) + 1.0
    for _ in range(_ITERATIONS):
        mid = (lo + hi) / 2
        if _plan(s, mid, num_samples, flops_at, target).flops < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 0.1 / num_samples:  # a tenth of a sample: finer changes nothing
            break
    plan = _plan(s, hi, num_samples, flops_at, target)
    if abs(plan.flops / target - 1.0) > TOLERANCE:
        raise ValueError(f"progressive: no run length within {TOLERANCE:.0%} of "
                         f"{s.budget_match}'s FLOPs ({plan.flops:.3g} vs {target:.3g}); the "
                         "dataset may be too small for one sample's step: use more samples")
    return plan
