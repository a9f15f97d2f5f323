"""The on-disk state of a selection service: what a restart needs to rebuild it exactly.

Layout of a state directory::

    meta.json      num_samples, policy settings, seed, EMA decay (fixed for the directory's life)
    ledger.bin     the ledger as of the committed epoch, replaced atomically at each commit
    wal/           write-ahead log of reports not yet committed (see :mod:`.wal`)
    labels.npy     the dataset's labels, if the service was given them (``set_labels``)
    policy.bin     a learning policy's state as of the newest computed plan (``assist``)

The meta file pins what plans are derived from: restarting with other settings would silently
change the plans of epochs already handed out, so it is refused instead.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Dict, Optional

import numpy as np

from ..core.ledger import Ledger, atomic_write
from .wal import WriteAheadLog

__all__ = ["StateDir"]

_FORMAT = 1


def _normalise(meta: Dict[str, Any]) -> Dict[str, Any]:
    """JSON round trip, so tuples and lists (and int/float keys) compare equal after a restart."""
    return json.loads(json.dumps(meta, sort_keys=True))


class StateDir:
    def __init__(self, path: str, fsync: bool = False) -> None:
        self.path = os.path.abspath(os.fspath(path))
        os.makedirs(self.path, exist_ok=True)
        self.meta_path = os.path.join(self.path, "meta.json")
        self.ledger_path = os.path.join(self.path, "ledger.bin")
        self.wal = WriteAheadLog(os.path.join(self.path, "wal"), fsync=fsync)

    def check_or_write_meta(self, meta: Dict[str, Any]) -> None:
        """First start: record ``meta``. Restart: refuse if anything that shapes plans changed."""
        meta = _normalise({"format": _FORMAT, **meta})
        if not os.path.exists(self.meta_path):
            atomic_write(self.meta_path, json.dumps(meta, indent=2, sort_keys=True).encode())
            return
        with open(self.meta_path, "rb") as f:
            try:
                stored = json.loads(f.read())
            except ValueError as err:
                raise ValueError(f"{self.meta_path} is not valid JSON ({err})") from None
        changed = sorted(k for k in set(meta) | set(stored) if meta.get(k) != stored.get(k))
        if changed:
            detail = "; ".join(f"{k}: stored {stored.get(k)!r}, given {meta.get(k)!r}"
                               for k in changed)
            raise ValueError(f"state directory {self.path} belongs to another configuration "
                             f"({detail}); use a fresh --state-dir or the stored settings")

    def write_meta(self, meta: Dict[str, Any]) -> None:
        meta = _normalise({"format": _FORMAT, **meta})
        atomic_write(self.meta_path, json.dumps(meta, indent=2, sort_keys=True).encode())

    def read_ledger(self) -> Optional[Ledger]:
        if not os.path.exists(self.ledger_path):
            return None
        return Ledger.load(self.ledger_path)

    def write_ledger(self, ledger: Ledger) -> None:
        ledger.save(self.ledger_path)

    # optional files: absent in directories of services that never used them
    def write_labels(self, labels: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(labels, "<i8"), allow_pickle=False)
        atomic_write(os.path.join(self.path, "labels.npy"), buf.getvalue())

    def read_labels(self) -> Optional[np.ndarray]:
        path = os.path.join(self.path, "labels.npy")
        return np.load(path, allow_pickle=False) if os.path.exists(path) else None

    def write_policy_state(self, state: Optional[bytes]) -> None:
        path = os.path.join(self.path, "policy.bin")
        if state is None:
            if os.path.exists(path):
                os.unlink(path)
            return
        atomic_write(path, state)

    def read_policy_state(self) -> Optional[bytes]:
        path = os.path.join(self.path, "policy.bin")
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            return f.read()
