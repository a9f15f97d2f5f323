"""The network selection service: a ZeroMQ ROUTER in front of one :class:`SelectionCore`.

**Threads.** One thread owns the socket. It answers the cheap requests itself (HELLO, REPORT,
STATS) and hands everything that can take long (PLAN, COMMIT, END_EPOCH, STATE_DICT,
LOAD_STATE, SET_LABELS) to a small pool of worker threads, whose replies it sends when they are
ready. So a report is never queued behind a 20M-sample commit or plan: the core itself runs
those off its state lock (see :mod:`.core`), and here they run off the serving thread.
(``mixpipe bench load`` measures report latency while a commit and a plan are in progress.)

**Who may talk to it** (the threat model is in docs/design.md, "Threat model"):

* With keys (:mod:`.keys`; ``mixpipe serve --keys DIR`` or the environment) the socket is a
  CURVE server: every connection is encrypted and only clients whose public key is authorised
  get past the handshake; a refused client is logged (its address and key, or that it spoke
  without CURVE) and counted in ``stats()["clients_refused"]``.
* Without keys it speaks plain ZeroMQ, and then only on a loopback or ``ipc://`` address:
  binding any other interface without keys is refused unless ``insecure=True``.
* ``LOAD_STATE`` replaces the whole state (the ledger, the policy): it is refused over the
  network unless the server was started with ``allow_load_state=True``
  (``--allow-load-state``).
* Messages larger than ``max_message_bytes`` (ZeroMQ's ``MAXMSGSIZE``; by default what the
  largest legitimate frame needs, a ledger of 16 bytes per sample, plus 64 MiB) make ZeroMQ drop
  the connection before the message is read.

A request that does not parse, or that the core refuses, gets an error reply naming the problem;
no input can stop the loop. A report is acknowledged only after the core has logged it.

Retries: a client that timed out resends the same request id. The server remembers the last
reply per client for the operations that change state, so a resent report is acknowledged
again instead of being applied twice (after a server restart that memory is gone; a report
resent then is applied twice within its epoch, which the ledger folds to the same result as
long as the losses are the same: a commit keeps one loss per id and epoch).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import queue
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Tuple

import zmq
from zmq.utils.monitor import parse_monitor_message

from .core import PlanNotReady, SelectionCore
from .keys import Gatekeeper, ServerKeys, server_keys
from .protocol import (Op, ProtocolError, Status, array_from_frame, decode, encode,
                       peek_request_id, state_from_wire, state_to_wire)

__all__ = ["SelectionServer", "is_local_endpoint"]

log = logging.getLogger(__name__)

_MUTATING = (Op.REPORT, Op.COMMIT, Op.LOAD_STATE, Op.SET_LABELS, Op.END_EPOCH)
_INLINE = (Op.HELLO, Op.REPORT, Op.STATS)  # cheap: answered on the serving thread
_REMEMBERED_CLIENTS = 4096
_REFUSALS = {zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "spoke without the server's CURVE keys "
                                                  "(or a different mechanism)",
             zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed the handshake",
             zmq.EVENT_HANDSHAKE_FAILED_AUTH: "was refused by the key check"}


def is_local_endpoint(endpoint: str) -> bool:
    """True for ``ipc://``, ``inproc://`` and TCP on a loopback address or ``localhost``."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or an interface name: not provably local


class SelectionServer:
    """Serve ``core`` on ``bind`` (e.g. ``tcp://127.0.0.1:5555``; port ``*`` picks a free one).

    Call :meth:`serve_forever` (blocking) or :meth:`start` (a background thread); :meth:`stop`
    ends the loop within ``poll_ms``.

    Args:
        keys: CURVE keys (:class:`~mixpipe.server.keys.ServerKeys` or a key directory); None
            takes them from the environment (``MIXPIPE_KEYS``, ...); ``False`` forces none.
        allow_load_state: accept ``LOAD_STATE`` (whole-state replacement) over the network.
        insecure: allow binding a non-loopback address without keys.
        max_message_bytes: ZeroMQ ``MAXMSGSIZE`` of the socket; None derives it from the size
            of the dataset.
        workers: threads that run plans, commits and state transfers.
    """

    def __init__(self, core: SelectionCore, bind: str, context: Optional[zmq.Context] = None,
                 poll_ms: int = 100, keys: Any = None, allow_load_state: bool = False,
                 insecure: bool = False, max_message_bytes: Optional[int] = None,
                 workers: int = 4) -> None:
        self.core = core
        resolved: Optional[ServerKeys] = None if keys is False else server_keys(keys)
        if resolved is None and not insecure and not is_local_endpoint(bind):
            raise ValueError(f"binding {bind} without keys would let any host that reaches it "
                             "read and rewrite the ledger: give keys (mixpipe serve --keys DIR, "
                             "made by --generate-keys DIR) or bind a loopback address (or pass "
                             "--insecure)")
        self.authenticated = resolved is not None
        self.allow_load_state = bool(allow_load_state)
        # a ZAP handler serves a whole context: an authenticated server gets one of its own
        if resolved is not None:
            self._ctx = zmq.Context()
        else:
            self._ctx = context or zmq.Context.instance()
        self._gate = Gatekeeper(self._ctx, resolved) if resolved is not None else None
        if max_message_bytes is None:
            max_message_bytes = 16 * core.num_samples + (64 << 20)
        self.max_message_bytes = int(max_message_bytes)
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        if self._gate is not None:
            self._gate.apply(self._sock)
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL |
            zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        try:
            self._sock.bind(bind)
        except zmq.ZMQError as err:
            self._close_sockets()
            raise ValueError(f"cannot bind {bind!r}: {err} (use tcp://HOST:PORT, port * for "
                             "a free one)") from None
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.poll_ms = int(poll_ms)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._replies: "OrderedDict[str, Tuple[int, List[Any]]]" = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=max(1, int(workers)),
                                        thread_name_prefix="mixpipe-serve-worker")
        self._done: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.requests_served = 0
        self.errors_replied = 0
        self.handshakes_refused = 0
        self._handlers: Dict[int, Callable] = {
            Op.HELLO: self._hello, Op.REPORT: self._report, Op.COMMIT: self._commit,
            Op.PLAN: self._plan, Op.STATS: self._stats, Op.STATE_DICT: self._state_dict,
            Op.LOAD_STATE: self._load_state, Op.SET_LABELS: self._set_labels,
            Op.END_EPOCH: self._end_epoch,
        }

    # ----------------------------------------------------------------------------- loop
    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(self.poll_ms))
                if not events:
                    continue
                if self._wake_r in events:
                    self._send_finished()
                if self._monitor in events:
                    self._log_refusals()
                if self._sock in events:
                    for _ in range(256):  # drain what is queued, then look at the others
                        try:
                            frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._serve_one(frames)
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._close_sockets()

    def _close_sockets(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        if self._gate is not None:
            self._gate.stop()
            self._ctx.term()
        for fd in ("_wake_r", "_wake_w"):
            if hasattr(self, fd):
                try:
                    os.close(getattr(self, fd))
                except OSError:
                    pass

    def start(self) -> "SelectionServer":
        self._thread = threading.Thread(target=self.serve_forever, name="mixpipe-serve",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _log_refusals(self) -> None:
        while True:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            kind = event["event"]
            self.handshakes_refused += 1
            if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                continue  # the key check logged it, with the peer's address and key
            log.warning("refused a client on %s: it %s", event["endpoint"].decode(),
                        _REFUSALS.get(kind, "failed the handshake"))

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
            client = client if isinstance(client, str) and len(client) <= 64 else None
            remembered = self._replies.get(client) if client is not None else None
            if op in _MUTATING and remembered is not None and remembered[0] == request_id:
                reply = remembered[1]  # a retry of a request already applied
            elif op in _INLINE:
                reply = self._run(op, request_id, meta, data)
                self._remember_if(op, client, request_id, reply)
            else:
                self._pool.submit(self._in_worker, envelope, op, request_id, meta, data, client)
                return
        except Exception as err:  # noqa: BLE001 - every failure becomes an error reply
            reply = self._error_reply(op, request_id, err)
        self._send(envelope, reply)

    def _run(self, op: int, request_id: int, meta: Dict[str, Any], data: List[Any]) -> List[Any]:
        try:
            reply_meta, reply_buffers = self._handlers[op](meta, data)
            return encode(op, request_id, reply_meta, reply_buffers)
        except Exception as err:  # noqa: BLE001 - every failure becomes an error reply
            return self._error_reply(op, request_id, err)

    def _in_worker(self, envelope: List[Any], op: int, request_id: int, meta: Dict[str, Any],
                   data: List[Any], client: Optional[str]) -> None:
        reply = self._run(op, request_id, meta, data)
        self._done.put((envelope, op, request_id, client, reply))
        try:
            os.write(self._wake_w, b"\x01")
        except OSError:  # the server stopped meanwhile: nobody to answer
            pass

    def _send_finished(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while True:
            try:
                envelope, op, request_id, client, reply = self._done.get_nowait()
            except queue.Empty:
                return
            self._remember_if(op, client, request_id, reply)
            self._send(envelope, reply)

    def _error_reply(self, op: int, request_id: int, err: Exception) -> List[Any]:
        self.errors_replied += 1
        known = (TypeError, ValueError, PermissionError, TimeoutError, PlanNotReady)
        kind = next((k.__name__ for k in known if isinstance(err, k)), type(err).__name__)
        if not isinstance(err, known):
            log.error("internal error serving op %s: %s: %s", op, type(err).__name__, err)
        meta: Dict[str, Any] = {"error": str(err), "kind": kind}
        if isinstance(err, PlanNotReady):
            meta["missing"] = err.missing[:256]
        return encode(op, request_id, meta, status=Status.ERROR)

    def _remember_if(self, op: int, client: Optional[str], request_id: int,
                     reply: List[Any]) -> None:
        if op in _MUTATING and client is not None:
            # replies to state-changing ops are one small header frame: cheap to keep
            self._replies[client] = (request_id, reply)
            self._replies.move_to_end(client)
            while len(self._replies) > _REMEMBERED_CLIENTS:
                self._replies.popitem(last=False)

    def _send(self, envelope: List[Any], reply: List[Any]) -> None:
        self.requests_served += 1
        try:
            self._sock.send_multipart(envelope + reply, copy=False)
        except zmq.ZMQError as err:  # the client went away: nothing to deliver to
            log.debug("reply dropped: %s", err)

    # ----------------------------------------------------------------------------- handlers
    def _hello(self, meta: Dict[str, Any], data: List[Any]) -> Tuple[Dict[str, Any], List[Any]]:
        core = self.core
        return {"num_samples": core.num_samples, "seed": core.seed,
                "settings": core.settings.to_dict(), "committed_epoch": core.committed_epoch,
                "authenticated": self.authenticated}, []

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

    def _end_epoch(self, meta: Dict[str, Any],
                   data: List[Any]) -> Tuple[Dict[str, Any], List[Any]]:
        self.core.end_epoch(meta.get("epoch"), meta.get("rank"), meta.get("world_size"))
        return {"committed_epoch": self.core.committed_epoch}, []

    def _plan(self, meta: Dict[str, Any], data: List[Any]) -> Tuple[Dict[str, Any], List[Any]]:
        # wait=0: a rank that is early gets PlanNotReady and asks again (the client polls), so
        # no worker thread is parked for the length of another rank's epoch
        plan = self.core.plan(meta.get("epoch"), rank=meta.get("rank", 0),
                              world_size=meta.get("world_size", 1), wait=0)
        return {}, [plan.to_bytes()]

    def _stats(self, meta: Dict[str, Any], data: List[Any]) -> Tuple[Dict[str, Any], List[Any]]:
        stats = self.core.stats()
        stats.update(requests_served=self.requests_served, errors_replied=self.errors_replied,
                     endpoint=self.endpoint, authenticated=self.authenticated,
                     clients_refused=self.handshakes_refused,
                     load_state_allowed=self.allow_load_state,
                     max_message_bytes=self.max_message_bytes)
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
        if not self.allow_load_state:
            log.warning("refused LOAD_STATE over the network (the server was started without "
                        "--allow-load-state)")
            raise PermissionError("LOAD_STATE (replacing the whole state) is off over the "
                                  "network: start the server with --allow-load-state "
                                  "(SelectionServer(allow_load_state=True)) to allow it")
        state = state_from_wire(meta.get("state", {}), data)
        self.core.load_state_dict(state)
        return {"committed_epoch": self.core.committed_epoch}, []
