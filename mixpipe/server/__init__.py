"""The selection service: one interface, an in-process and a network implementation.

* :class:`InProcessService`: the embedded default, called directly (thread-safe).
* ``mixpipe serve`` (:class:`SelectionServer`) and :func:`connect`: the same service over ZeroMQ
  for multi-process and multi-node runs.

Both share :class:`SelectionCore`, so they behave identically; see its module for the semantics
of report, commit and plan.
"""
from .base import SelectionService
from .core import SelectionCore
from .inprocess import InProcessService

__all__ = ["SelectionService", "SelectionCore", "InProcessService", "connect", "RemoteService",
           "ServerUnavailable", "ServerUnavailableWarning", "SelectionServer"]


def __getattr__(name: str):
    # The network pieces need pyzmq; import them only when asked for.
    if name in ("connect", "RemoteService", "ServerUnavailable", "ServerUnavailableWarning"):
        from . import client
        return getattr(client, name)
    if name == "SelectionServer":
        from .network import SelectionServer
        return SelectionServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
