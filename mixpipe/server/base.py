"""The selection service interface shared by the in-process and network implementations."""
from __future__ import annotations

from typing import Any, Dict, Protocol, runtime_checkable

import numpy as np

from ..core.plan import MixPlan

__all__ = ["SelectionService"]


@runtime_checkable
class SelectionService(Protocol):
    """What trainers report to and loaders fetch plans from (docs/design.md, the selection server).

    * ``report`` is all or nothing: a refused report raises and leaves the ledger unchanged.
    * ``plan(epoch)`` is derived only from losses committed for epochs before ``epoch``, the policy
      settings and the seed, so every rank, and a restarted server, gets the same plan.
    """

    num_samples: int

    def report(self, epoch: int, ids: np.ndarray, losses: np.ndarray, rank: int = 0) -> None: ...

    def commit(self, epoch: int) -> None: ...

    def plan(self, epoch: int, rank: int = 0, world_size: int = 1) -> MixPlan: ...

    def set_labels(self, labels: Any) -> None: ...

    def stats(self) -> Dict[str, Any]: ...

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...
