"""The network selection service: a ZeroMQ ROUTER in front of one :class:`SelectionCore`.

One thread owns the socket and serves requests one at a time, so the core sees the same
sequence of calls an in-process caller would make. Many clients (DEALER or REQ sockets) can be
connected at once; their requests are interleaved message by message.

The loop also runs the policy when a plan is first asked for, so other requests wait that long
(``mixpipe bench server`` measures it): client timeouts must be longer than the largest plan's
computation.

A request that does not parse, or that the core refuses, gets an error reply naming the problem;
no input can stop the loop. A report is acknowledged only after the core has logged it.

Retries: a client that timed out resends the same request id. The server remembers the last
reply per client for the operations that change state, so a resent report is acknowledged
again instead of being applied twice (after a server restart that memory is gone; a report
resent then is applied twice within its epoch, which the ledger folds to the same result as
long as the losses are the same: a commit keeps one loss per id and epoch).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import zmq

from .core import SelectionCore
from .protocol import (Op, ProtocolError, Status, array_from_frame, decode, encode,
                       peek_request_id, state_from_wire, state_to_wire)

__all__ = ["SelectionServer"]

log = logging.getLogger(__name__)

_MUTATING = (Op.REPORT, Op.COMMIT, Op.LOAD_STATE, Op.SET_LABELS)
_REMEMBERED_CLIENTS = 4096


class SelectionServer:
    """Serve ``core`` on ``bind`` (e.g. ``tcp://127.0.0.1:5555``; port ``*`` picks a free one).

    Call :meth:`serve_forever` (blocking) or :meth:`start` (a background thread); :meth:`stop`
    ends the loop within ``poll_ms``.
    """

    def __init__(self, core: SelectionCore, bind: str, context: Optional[zmq.Context] = None,
                 poll_ms: int = 100) -> None:
        self.core = core
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(bind)
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.poll_ms = int(poll_ms)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._replies: "OrderedDict[str, Tuple[int, List[Any]]]" = OrderedDict()
        self.requests_served = 0
        self.errors_replied = 0
        self._handlers: Dict[int, Callable] = {
            Op.HELLO: self._hello, Op.REPORT: self._report, Op.COMMIT: self._commit,
            Op.PLAN: self._plan, Op.STATS: self._stats, Op.STATE_DICT: self._state_dict,
            Op.LOAD_STATE: self._load_state, Op.SET_LABELS: self._set_labels,
        }

    # ----------------------------------------------------------------------------- loop
    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(self.poll_ms):
                    continue
                while True:  # drain what is queued before polling again
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._serve_one(frames)
        finally:
            self._sock.close(linger=0)

    def start(self) -> "SelectionServer":
        self._thread = threading.Thread(target=self.serve_forever, name="mixpipe-serve",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ----------------------------------------------------------------------------- dispatch
    def _serve_one(self, frames: List[zmq.Frame]) -> None:
        identity, body = frames[0], frames[1:]
        envelope = [identity]
        if body and len(body[0]) == 0:  # a REQ client's empty delimiter
            envelope.append(body[0])
            body = body[1:]
        buffers = [f.buffer for f in body]
        request_id = peek_request_id(buffers[0]) if buffers else 0
        op = 0
        try:
            op, status, request_id, meta, data = decode(buffers)
            if status != Status.OK or op not in self._handlers:
                raise ProtocolError(f"op {op} with status {status} is not a request")
            client = meta.get("client")
            remembered = self._replies.get(client) if isinstance(client, str) else None
            if op in _MUTATING and remembered is not None and remembered[0] == request_id:
                reply = remembered[1]  # a retry of a request already applied
            else:
                reply_meta, reply_buffers = self._handlers[op](meta, data)
                reply = encode(op, request_id, reply_meta, reply_buffers)
                if op in _MUTATING and isinstance(client, str):
                    self._remember(client, request_id, reply)
        except Exception as err:  # noqa: BLE001 - every failure becomes an error reply
            self.errors_replied += 1
            kind = "TypeError" if isinstance(err, TypeError) else \
                "ValueError" if isinstance(err, ValueError) else type(err).__name__
            if not isinstance(err, (TypeError, ValueError)):
                log.exception("internal error serving op %s", op)
            reply = encode(op, request_id, {"error": str(err), "kind": kind},
                           status=Status.ERROR)
        self.requests_served += 1
        try:
            self._sock.send_multipart(envelope + reply, copy=False)
        except zmq.ZMQError as err:  # the client went away: nothing to deliver to
            log.debug("reply dropped: %s", err)

    def _remember(self, client: str, request_id: int, reply: List[Any]) -> None:
        # replies to state-changing ops are one small header frame: cheap to keep
        self._replies[client] = (request_id, reply)
        self._replies.move_to_end(client)
        while len(self._replies) > _REMEMBERED_CLIENTS:
            self._replies.popitem(last=False)

    # ----------------------------------------------------------------------------- handlers
    def _hello(self, meta: Dict[str, Any], data: List[Any]) -> Tuple[Dict[str, Any], List[Any]]:
        core = self.core
        return {"num_samples": core.num_samples, "seed": core.seed,
                "settings": core.settings.to_dict(), "committed_epoch": core.committed_epoch}, []

    def _report(self, meta: Dict[str, Any], data: List[Any]) -> Tuple[Dict[str, Any], List[Any]]:
        if len(data) != 2:
            raise ProtocolError(f"report needs 2 data frames (ids, losses), got {len(data)}")
        ids = array_from_frame(data[0], meta.get("ids_dtype"), "ids")
        losses = array_from_frame(data[1], meta.get("losses_dtype"), "losses")
        # the frames are this message's own memory: no need to copy them once more
        self.core.report(meta.get("epoch"), ids, losses, rank=meta.get("rank", 0), copy=False)
        return {"accepted": int(ids.size)}, []

    def _commit(self, meta: Dict[str, Any], data: List[Any]) -> Tuple[Dict[str, Any], List[Any]]:
        self.core.commit(meta.get("epoch"))
        return {"committed_epoch": self.core.committed_epoch}, []

    def _plan(self, meta: Dict[str, Any], data: List[Any]) -> Tuple[Dict[str, Any], List[Any]]:
        plan = self.core.plan(meta.get("epoch"), rank=meta.get("rank", 0),
                              world_size=meta.get("world_size", 1))
        return {}, [plan.to_bytes()]

    def _stats(self, meta: Dict[str, Any], data: List[Any]) -> Tuple[Dict[str, Any], List[Any]]:
        stats = self.core.stats()
        stats.update(requests_served=self.requests_served, errors_replied=self.errors_replied,
                     endpoint=self.endpoint)
        return stats, []

    def _state_dict(self, meta: Dict[str, Any],
                    data: List[Any]) -> Tuple[Dict[str, Any], List[Any]]:
        return state_to_wire(self.core.state_dict())

    def _set_labels(self, meta: Dict[str, Any],
                    data: List[Any]) -> Tuple[Dict[str, Any], List[Any]]:
        if len(data) != 1:
            raise ProtocolError(f"set_labels needs 1 data frame (labels), got {len(data)}")
        self.core.set_labels(array_from_frame(data[0], meta.get("labels_dtype"), "labels"))
        return {}, []

    def _load_state(self, meta: Dict[str, Any],
                    data: List[Any]) -> Tuple[Dict[str, Any], List[Any]]:
        state = state_from_wire(meta.get("state", {}), data)
        self.core.load_state_dict(state)
        return {"committed_epoch": self.core.committed_epoch}, []
