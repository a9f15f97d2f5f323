"""Assist: skip the samples an online assistant rates as no longer informative (AutoAssist).

Each plan first trains the assistant (:mod:`mixpipe.core.assist`, a logistic regression on loss
history, trend, times seen, gap and class) on what happened since the previous plan, then scores
every seen sample: ``p`` = predicted probability that its next loss lies above the
``target_quantile`` of the epoch's losses. Seen samples with ``p < threshold`` are low-value:

* per class ``c`` (all samples one class without labels) a (seed, epoch)-random share
  ``skip_ratio`` of its ``n_c`` low-value samples is skipped, but never more than leaves
  ``class_floor`` of the class's samples (counted over the whole dataset) in the plan;
* if the total exceeds ``max_skip`` of the dataset, every class's count is scaled down (floor) to
  fit, which only keeps more;
* with ``rescale`` the kept low-value samples of class ``c`` carry ``loss_scale = n_c / (n_c -
  k_c)``: each low-value sample's expected loss weight, P(kept) x scale, is 1 (as in shrink).

Never-seen samples, and every sample in the first ``warmup_epochs`` epochs, in the last
``anneal_epochs`` of ``epochs``, or while the assistant has not been fitted yet, are kept.
With ``mix`` the kept samples then go through the mixtrain rules exactly as in shrink.

Where the assistant trains: inside the plan computation, which the selection server runs outside
its lock on a snapshot, so reports go on meanwhile (the trainer does wait for the plan at the
start of an epoch: about 0.7 s of CPU per million samples with 100 classes, measured on this
machine; shrink takes 0.09 s). The fitted weights and the snapshot they will be judged against
travel as the policy's state (bytes; :class:`mixpipe.core.assist.AssistState`, 16 bytes per
sample), kept by the server between plans, in its state_dict and in its state directory, so a
resumed or restarted service plans exactly as an uninterrupted one. Called without a state (the
stateless ``make_plan``) the assistant starts cold and the plan skips nothing.

Labels reach the policy on the snapshot (``LedgerSnapshot.labels``), given to the service once
with ``set_labels(dataset.labels)`` (in-process or over the network); without them the class
feature and the per-class floor fall back to one class.

Use::

    svc = InProcessService(len(train), AssistSettings(epochs=E), seed=0)
    svc.set_labels(train.labels)
    # assist + mixtrain: AssistSettings(epochs=E, mix=MixTrainSettings(fraction=0.5, ...))

Suggested settings: the defaults (skip at most 30% of an epoch, half of each class always kept,
unbiased loss scales); ``anneal_epochs=1`` lets the last epoch see everything, as InfoBatch does.

Example::

    >>> from mixpipe.core.ledger import Ledger
    >>> from mixpipe.core.policies import make_plan_with_state
    >>> rng = np.random.default_rng(0)
    >>> labels = np.arange(400) % 4
    >>> ledger, state = Ledger(400), None
    >>> for epoch in range(4):  # class 0 stays hard, the others get easy
    ...     plan, state = make_plan_with_state(dataclasses.replace(ledger.snapshot(),
    ...         labels=labels), AssistSettings(max_skip=0.5), seed=0, epoch=epoch, state=state)
    ...     loss = np.where(labels == 0, 2.0, 0.3) + rng.uniform(0, 0.5, 400)
    ...     ledger.update(epoch, np.arange(400), loss.astype(np.float32))
    >>> plan, state = make_plan_with_state(dataclasses.replace(ledger.snapshot(), labels=labels),
    ...     AssistSettings(max_skip=0.5), seed=0, epoch=4, state=state)
    >>> bool(np.isin(np.flatnonzero(labels == 0), plan.skipped).any()), plan.skipped.size
    (False, 150)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .. import assist as core
from ..ledger import LedgerSnapshot
from ..plan import MixPlan
from . import STATE_CHECKS, PolicySettings, epoch_rng, register, register_stateful
from ._common import STREAM_SKIP, check_float, check_int
from .mixtrain import MixTrainSettings, plan_kept
from .shrink import annealed, mix_settings

__all__ = ["AssistSettings", "plan_assist", "plan_assist_step", "choose_skips", "STREAM_ASSIST"]

STREAM_ASSIST = 2  #: epoch_rng stream of the assistant's training subset


@dataclasses.dataclass(frozen=True)
class AssistSettings(PolicySettings):
    """Settings of the assist policy (rules in the module docstring).

    Attributes:
        warmup_epochs: epochs ``0 .. warmup_epochs - 1`` skip nothing (>= 0; the assistant needs
            two reported epochs before its first fit anyway).
        target_quantile: a sample counts as informative when its next loss lies above this
            quantile of the epoch's losses, in (0, 1).
        threshold: samples with predicted P(informative) below it are low-value, in (0, 1).
        skip_ratio: share of each class's low-value samples skipped per epoch, in [0, 1].
        max_skip: the most of the dataset one epoch may skip, in [0, 1).
        class_floor: every class keeps at least this share of its samples, in [0, 1].
        rescale: kept low-value samples get the loss scale that makes skipping unbiased.
        l2: strength of the pull towards the previous epoch's weights, > 0.
        newton_steps: Newton steps per epoch's fit, in [1, 50].
        max_train: most training pairs per fit (a random subset beyond), >= 16.
        epochs, anneal_epochs: with the run's length known, its last ``anneal_epochs`` epochs
            skip nothing.
        mix: mixtrain settings for the kept samples (or a dict of them), None for none.
    """

    name = "assist"

    warmup_epochs: int = 2
    target_quantile: float = 0.5
    threshold: float = 0.5
    skip_ratio: float = 0.5
    max_skip: float = 0.3
    class_floor: float = 0.5
    rescale: bool = True
    l2: float = 0.01
    newton_steps: int = 4
    max_train: int = 262144
    epochs: Optional[int] = None
    anneal_epochs: int = 0
    mix: Optional[MixTrainSettings] = None

    def __post_init__(self) -> None:
        check_int(self, "warmup_epochs", 0)
        check_float(self, "target_quantile", 0.0, 1.0, lo_open=True, hi_open=True)
        check_float(self, "threshold", 0.0, 1.0, lo_open=True, hi_open=True)
        check_float(self, "skip_ratio", 0.0, 1.0)
        check_float(self, "max_skip", 0.0, 1.0, hi_open=True)
        check_float(self, "class_floor", 0.0, 1.0)
        if not isinstance(self.rescale, (bool, np.bool_)):
            raise ValueError(f"AssistSettings.rescale must be True or False, got "
                             f"{self.rescale!r}")
        object.__setattr__(self, "rescale", bool(self.rescale))
        check_float(self, "l2", 0.0, 1e6, lo_open=True)
        check_int(self, "newton_steps", 1, 50)
        check_int(self, "max_train", 16)
        check_int(self, "epochs", 1, optional=True)
        check_int(self, "anneal_epochs", 0)
        if self.anneal_epochs and self.epochs is None:
            raise ValueError("AssistSettings.anneal_epochs needs AssistSettings.epochs (the run's "
                             "length) to be set")
        if self.epochs is not None and self.anneal_epochs > self.epochs:
            raise ValueError(f"AssistSettings.anneal_epochs must lie in [0, epochs="
                             f"{self.epochs}], got {self.anneal_epochs}")
        object.__setattr__(self, "mix", mix_settings(self.mix, "AssistSettings.mix"))

    def to_dict(self) -> Dict[str, Any]:
        d = super().to_dict()
        d["mix"] = None if self.mix is None else self.mix.to_dict()
        return d


def choose_skips(p: np.ndarray, ids: np.ndarray, classes: np.ndarray, num_samples: int,
                 settings: AssistSettings, seed: int, epoch: int) -> tuple:
    """(skip bool[N], loss scale float32[N] or None) from the scores ``p`` of samples ``ids``.

    ``classes`` is int64[N] (all zeros without labels). The caps are applied to counts first;
    only then are the skipped samples drawn, per class in class order, from one random stream.
    """
    skip = np.zeros(num_samples, bool)
    low = ids[p < settings.threshold]
    if low.size == 0 or settings.skip_ratio == 0.0:
        return skip, None
    size = np.bincount(classes, minlength=1)
    low_cls = classes[low]
    n_low = np.bincount(low_cls, minlength=size.size)
    keep_min = np.ceil(settings.class_floor * size).astype(np.int64)
    k = np.minimum(np.floor(settings.skip_ratio * n_low).astype(np.int64), size - keep_min)
    k = np.maximum(k, 0)
    cap = int(math.floor(settings.max_skip * num_samples))
    if int(k.sum()) > cap:
        k = (k * cap) // int(k.sum())  # integer maths: exactly floor(k_c * cap / total)
    if not k.any():
        return skip, None
    rng = epoch_rng(seed, epoch, STREAM_SKIP)
    by_class = low[np.argsort(low_cls, kind="stable")]  # ids ascending inside each class
    starts = np.concatenate([[0], np.cumsum(n_low)])
    scale = np.ones(num_samples, np.float32) if settings.rescale else None
    for c in np.flatnonzero(k):  # loops over classes, not samples
        members = by_class[starts[c]:starts[c + 1]].copy()
        rng.shuffle(members)
        skip[members[:k[c]]] = True
        if scale is not None:
            scale[members[k[c]:]] = np.float32(n_low[c] / (n_low[c] - k[c])) \
                if n_low[c] > k[c] else np.float32(1.0)
    return skip, scale


def _fit(state: core.AssistState, snapshot: LedgerSnapshot, classes_n: int,
         settings: AssistSettings, seed: int, epoch: int) -> Tuple[Optional[np.ndarray], dict]:
    """Weights after this epoch's fit (the old ones if there is nothing new to learn from)."""
    d = core.NUM_BASE_FEATURES + classes_n
    w0 = state.weights if state.weights is not None and state.weights.size == d and \
        state.num_classes == classes_n else None
    if state.memory is None:
        return w0, {"fitted": False, "reason": "no remembered snapshot yet"}
    memory = dataclasses.replace(state.memory, labels=snapshot.labels)
    x, cls, y = core.training_pairs(memory, state.memory_epoch, snapshot, classes_n,
                                    settings.target_quantile)
    if y.size < 2:
        return w0, {"fitted": False, "reason": f"{y.size} training pairs"}
    if y.size > settings.max_train:
        pick = np.sort(epoch_rng(seed, epoch, STREAM_ASSIST).choice(y.size, settings.max_train,
                                                                    replace=False))
        x, cls, y = x[pick], cls[pick], y[pick]
    start = np.zeros(d) if w0 is None else w0
    w = core.fit_assistant(x, cls, y, start, settings.l2, settings.newton_steps)
    p = core.predict(w, x, cls)
    info = {"fitted": True, "pairs": int(y.size), "positive_rate": float(y.mean()),
            "train_accuracy": float(np.mean((p >= 0.5) == y))}
    return w, info


@register_stateful(AssistSettings)
def plan_assist_step(snapshot: LedgerSnapshot, settings: AssistSettings, seed: int, epoch: int,
                     state: Optional[bytes]) -> Tuple[MixPlan, bytes]:
    """(plan, new state): fit the assistant on what happened since ``state``, then plan."""
    n = snapshot.num_samples
    old = core.AssistState(n) if state is None else core.AssistState.from_bytes(state, n)
    classes_n = core.num_classes_of(snapshot.labels)
    weights, info = _fit(old, snapshot, classes_n, settings, seed, epoch)
    skip, scale = np.zeros(n, bool), None
    active = weights is not None and epoch >= settings.warmup_epochs and \
        not annealed(settings, epoch)
    if active:
        ids, x, cls = core.features(snapshot, epoch, classes_n)
        p = core.predict(weights, x, cls)
        classes = np.zeros(n, np.int64) if snapshot.labels is None else snapshot.labels
        skip, scale = choose_skips(p, ids, classes, n, settings, seed, epoch)
        info.update(scored=int(ids.size), low_value=int(np.count_nonzero(p < settings.threshold)))
    info.update(epoch=epoch, skipped=int(np.count_nonzero(skip)), active=bool(active))
    memory = dataclasses.replace(snapshot, labels=None)
    new = core.AssistState(n, weights, classes_n, memory, epoch, info)
    return plan_kept(snapshot, skip, scale, settings.mix, seed, epoch), new.to_bytes()


@register(AssistSettings)
def plan_assist(snapshot: LedgerSnapshot, settings: AssistSettings, seed: int,
                epoch: int) -> MixPlan:
    """The stateless entry point: a cold assistant, so nothing is skipped (mixing still runs)."""
    return plan_assist_step(snapshot, settings, seed, epoch, None)[0]


def check_state(state: bytes, num_samples: int) -> None:
    """Parse ``state`` and refuse what no plan could have written (the server calls this on a
    state from outside before accepting it)."""
    parsed = core.AssistState.from_bytes(state, num_samples)
    parsed.check()


STATE_CHECKS[AssistSettings.name] = check_state
