"""Selection policies: pure functions ``(ledger snapshot, settings, seed, epoch) -> MixPlan``.

Each policy lives in its own module and registers its settings dataclass here. The same inputs
give a byte-identical plan on every rank and after a restart, so a policy may use randomness only
through :func:`epoch_rng`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple, Type

import numpy as np

from ..ledger import LedgerSnapshot
from ..plan import MixPlan

__all__ = ["PolicySettings", "register", "make_plan", "settings_from_dict", "epoch_rng",
           "POLICIES", "STATEFUL", "register_stateful", "make_plan_with_state", "STATE_CHECKS",
           "check_policy_state"]


@dataclasses.dataclass(frozen=True)
class PolicySettings:
    """Base of every policy's frozen settings; subclasses validate in ``__post_init__``."""

    name = "base"

    def to_dict(self) -> Dict[str, Any]:
        return {"policy": self.name, **dataclasses.asdict(self)}


#: policy name -> (settings class, plan function)
POLICIES: Dict[str, tuple] = {}


def register(settings_cls: Type[PolicySettings]) -> Callable:
    """Decorator: register ``fn(snapshot, settings, seed, epoch) -> MixPlan`` under the name."""

    def wrap(fn: Callable) -> Callable:
        POLICIES[settings_cls.name] = (settings_cls, fn)
        return fn

    return wrap


#: policy name -> ``fn(snapshot, settings, seed, epoch, state) -> (MixPlan, state)`` for policies
#: that learn across epochs (``assist``). The state is opaque bytes (None before the first plan):
#: the server keeps it between plans and in its state_dict, so a resumed run plans exactly as an
#: uninterrupted one. Such a policy also registers a stateless function (a cold start) above.
STATEFUL: Dict[str, Callable] = {}


def register_stateful(settings_cls: Type[PolicySettings]) -> Callable:
    """Decorator: register the state-threading plan function of a learning policy."""

    def wrap(fn: Callable) -> Callable:
        STATEFUL[settings_cls.name] = fn
        return fn

    return wrap


#: policy name -> ``check(state: bytes, num_samples: int) -> None`` (raises ValueError): how a
#: learning policy vets a state that comes from outside (``load_state_dict``, a state directory)
#: before the service accepts it, so garbage cannot make every later plan fail.
STATE_CHECKS: Dict[str, Callable[[bytes, int], None]] = {}


def check_policy_state(settings: PolicySettings, state: Any, num_samples: int) -> None:
    """Refuse a policy state its policy cannot use (ValueError naming the problem)."""
    _load_builtin()
    if state is None:
        return  # every policy starts cold
    if not isinstance(state, (bytes, bytearray)):
        raise TypeError(f"policy_state must be bytes or None, got {type(state).__name__}")
    if settings.name not in STATEFUL:
        raise ValueError(f"policy {settings.name!r} keeps no state, but policy_state holds "
                         f"{len(state)} bytes: drop it (None) or use the matching settings")
    check = STATE_CHECKS.get(settings.name)
    if check is not None:
        check(bytes(state), int(num_samples))


def epoch_rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    """The only source of randomness a policy may use: fixed by (seed, epoch, stream)."""
    return np.random.Generator(np.random.PCG64([int(seed) & 0xFFFFFFFF, int(epoch), int(stream)]))


def _load_builtin() -> None:
    """Import the built-in policies, which register themselves (late: they import this module)."""
    from . import assist, budget, mixtrain, none, random, shrink  # noqa: F401


def settings_from_dict(d: Dict[str, Any]) -> PolicySettings:
    """Inverse of ``PolicySettings.to_dict``; unknown policy or field -> ValueError naming it."""
    _load_builtin()
    d = dict(d)
    name = d.pop("policy", None)
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES)}")
    cls = POLICIES[name][0]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
        raise ValueError(f"policy {name!r} has no setting(s) {sorted(unknown)}; "
                         f"known: {sorted(fields)}")
    return cls(**d)


def make_plan(snapshot: LedgerSnapshot, settings: PolicySettings, seed: int, epoch: int) -> MixPlan:
    """Run the policy the settings belong to; the plan is validated before it is returned."""
    _load_builtin()
    if settings.name not in POLICIES:
        raise ValueError(f"unknown policy {settings.name!r}; known: {sorted(POLICIES)}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    _, fn = POLICIES[settings.name]
    return fn(snapshot, settings, int(seed), int(epoch)).validate()


def make_plan_with_state(snapshot: LedgerSnapshot, settings: PolicySettings, seed: int, epoch: int,
                         state: Optional[bytes] = None) -> Tuple[MixPlan, Optional[bytes]]:
    """:func:`make_plan` that threads a learning policy's state; others pass ``state`` through."""
    _load_builtin()
    step = STATEFUL.get(settings.name)
    if step is None:
        return make_plan(snapshot, settings, seed, epoch), state
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    plan, new_state = step(snapshot, settings, int(seed), int(epoch), state)
    return plan.validate(), new_state
