"""The selection service: one interface, an in-process and a network implementation.

* :class:`InProcessService`: the embedded default, called directly (thread-safe).
* ``mixpipe serve`` (:class:`SelectionServer`) and :func:`connect`: the same service over ZeroMQ
  for multi-process and multi-node runs.

Both share :class:`SelectionCore`, so they behave identically; see its module for the semantics
of report, commit, end_epoch and plan.

Threat model (docs/design.md, "Threat model"): the in-process service trusts its caller. The
network server trusts a client only as far as its keys: with CURVE keys (:mod:`.keys`) only
authorised clients get past the handshake (refusals are logged); without keys it binds loopback
only. An authorised client may report, commit, plan and read the whole state, but may replace
the state (``LOAD_STATE``) only when the server was started with ``allow_load_state``. Every
argument is bounded and checked before anything changes, whoever sends it.
"""
from .base import SelectionService
from .core import PlanNotReady, SelectionCore
from .inprocess import InProcessService

__all__ = ["SelectionService", "SelectionCore", "InProcessService", "connect", "RemoteService",
           "ServerUnavailable", "ServerRefused", "ServerUnavailableWarning", "SelectionServer",
           "PlanNotReady"]


def __getattr__(name: str):
    # The network pieces need pyzmq; import them only when asked for.
    if name in ("connect", "RemoteService", "ServerUnavailable", "ServerRefused",
                "ServerUnavailableWarning"):
        from . import client
        return getattr(client, name)
    if name == "SelectionServer":
        from .network import SelectionServer
        return SelectionServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
