"""The embedded selection service: the core called directly, in the trainer's process."""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

from ..core.policies import PolicySettings, settings_from_dict
from .core import SelectionCore

__all__ = ["InProcessService", "resolve_settings"]

PolicyLike = Union[PolicySettings, Dict[str, Any], str, None]


def resolve_settings(policy: PolicyLike) -> PolicySettings:
    """Settings from a settings object, a ``to_dict()``-style dict, or a policy name."""
    if policy is None:
        policy = "none"
    if isinstance(policy, PolicySettings):
        return policy
    if isinstance(policy, str):
        return settings_from_dict({"policy": policy})
    if isinstance(policy, dict):
        return settings_from_dict(policy)
    raise TypeError(f"policy must be PolicySettings, a dict or a policy name, got "
                    f"{type(policy).__name__}")


class InProcessService(SelectionCore):
    """:class:`~mixpipe.server.base.SelectionService` in the caller's process (thread-safe).

    Example:
        >>> import numpy as np
        >>> svc = InProcessService(4, policy="none", seed=1)
        >>> svc.report(0, np.array([0, 1]), np.array([0.5, 2.0], np.float32))
        >>> svc.plan(1).num_slots  # asking for epoch 1 commits epoch 0 first
        4
        >>> svc.stats()["seen"]
        2

    Args:
        num_samples: dataset size.
        policy: :class:`PolicySettings`, a dict such as ``{"policy": "mixtrain", ...}`` or a
            policy name (its default settings); None means ``"none"`` (no mixing).
        seed: fixes the policy's random choices together with the epoch.
        state_dir: directory for the ledger file and the write-ahead log (crash safety); None
            keeps everything in memory.
        wait: default seconds ``plan(epoch, rank, world_size)`` with ``world_size > 1`` waits
            for the other ranks to finish the previous epoch before ``TimeoutError``: 1800 s.
        log_after: default seconds before such a wait first logs a warning naming the missing
            ranks (10 s; then at doubling delays), so a job stuck on a rank that never started
            says so instead of hanging silently.
        ema_decay, fsync, plan_cache_size, max_epochs_ahead, max_losses_per_sample: see
            :class:`~mixpipe.server.core.SelectionCore`.
    """

    def __init__(self, num_samples: int, policy: PolicyLike = None, seed: int = 0,
                 state_dir: Optional[str] = None, *, ema_decay: float = 0.7,
                 fsync: bool = False, plan_cache_size: int = 3, max_epochs_ahead: int = 32,
                 max_losses_per_sample: int = 8, wait: float = 1800.0,
                 log_after: float = 10.0) -> None:
        super().__init__(num_samples, resolve_settings(policy), seed=seed, state_dir=state_dir,
                         ema_decay=ema_decay, fsync=fsync, plan_cache_size=plan_cache_size,
                         max_epochs_ahead=max_epochs_ahead,
                         max_losses_per_sample=max_losses_per_sample, wait=wait,
                         log_after=log_after)
