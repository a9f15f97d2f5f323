"""Client of the network selection service: the same interface as the in-process service.

Reliability follows ZeroMQ's "lazy pirate" pattern: send, wait up to ``timeout`` seconds for the
reply, and on silence close the socket (dropping whatever it still queues), open a fresh one and
resend the same request id, up to ``retries`` more times. Replies to an abandoned attempt that
arrive late are recognised by their request id and discarded.

When the server cannot be reached at all:

* ``plan()`` returns a no-mixing plan (every sample single, in the order the ``none`` policy
  would use for this seed and epoch, sharded like a server plan) and warns once per client:
  training goes on, unmixed. This needs ``num_samples``: pass it to :func:`connect`, or it is
  learned from the first successful call. Without it, ``plan()`` raises :class:`ServerUnavailable`.
  Every rank that falls back gets its shard of the same no-mixing plan; if only some ranks lose
  the server in one epoch, their shards and the server's overlap for that epoch (a sample may be
  seen twice or not at all), which costs accuracy noise, never a crash.
* ``report()``, ``commit()``, ``stats()`` and the state calls raise :class:`ServerUnavailable`
  (a ``ConnectionError``): losses are not queued here; the trainer decides whether to drop them,
  buffer them or stop.

How long a client can take to fail, stated: when nobody accepts the connection (nothing listens
at the address), each attempt gives up after ``connect_timeout`` seconds (default
``min(timeout, 5)``) instead of ``timeout``, so the call fails (or ``plan()`` falls back) after
at most ``(retries + 1) * connect_timeout`` seconds, 15 s with the defaults, with a one-line
:class:`ServerUnavailable` naming the address. An address without a transport
(``"localhost:5999"``) is refused by :func:`connect` at once, naming the fix.

Authentication: with keys (``keys=`` a key directory or :class:`~.keys.ClientKeys`, else the
environment: ``MIXPIPE_KEYS``, ``MIXPIPE_SERVER_KEY`` + ``MIXPIPE_CLIENT_KEY`` +
``MIXPIPE_CLIENT_SECRET``) the client speaks CURVE. A server that refuses the handshake (keys it
does not know, keys where it expects none, or none where it expects them) raises
:class:`ServerRefused` (a ``PermissionError``) at once: that is a configuration error, not an
outage, so no fallback hides it.

Several ranks on one server: ``plan(e, rank, world_size)`` with ``world_size > 1`` waits until
every rank has finished epoch ``e - 1`` (the server answers "not ready" and the client asks
again), for at most ``wait`` seconds, then raises ``TimeoutError`` naming the missing ranks.

Errors the server reports (a refused report, an unknown epoch) are raised here as ``ValueError``,
``TypeError`` or ``PermissionError`` with the server's message.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from ..core.plan import MixPlan
from ..core.policies import epoch_rng
from .keys import ClientKeys, apply_client, client_keys
from .protocol import Op, ProtocolError, Status, array_meta, decode, encode, state_from_wire, \
    state_to_wire

__all__ = ["RemoteService", "ServerUnavailable", "ServerRefused", "ServerUnavailableWarning",
           "connect", "fallback_plan", "check_url"]

log = logging.getLogger(__name__)


class ServerUnavailable(ConnectionError):
    """No reply from the selection server within the timeout, after every retry."""


class ServerRefused(PermissionError):
    """The server refused this client's handshake: wrong, missing or unexpected CURVE keys."""


class ServerUnavailableWarning(RuntimeWarning):
    """The selection server is unreachable; plans fall back to no mixing."""


_TRANSPORTS = ("tcp://", "ipc://", "inproc://")
_SERVER_ERRORS = {"TypeError": TypeError, "PermissionError": PermissionError,
                  "TimeoutError": TimeoutError}
_REFUSED = (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
            zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_SUCCEEDED |
           zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL |
           zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def check_url(url: Any) -> str:
    """``url`` if it names a ZeroMQ transport; a one-line ValueError naming the fix if not."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"server address must be a string such as 'tcp://127.0.0.1:5555', got "
                         f"{url!r}")
    if not url.startswith(_TRANSPORTS):
        if "://" in url:
            raise ValueError(f"server address {url!r} uses an unknown transport: use "
                             "tcp://HOST:PORT (or ipc://PATH)")
        raise ValueError(f"server address {url!r} has no transport: use 'tcp://{url}'")
    return url


def fallback_plan(num_samples: int, epoch: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> MixPlan:
    """The plan a client uses when the server is gone: what the ``none`` policy would give.

    Every rank that falls back computes the same global order from (seed, epoch), so the shards
    still partition the dataset.
    """
    order = epoch_rng(seed, epoch).permutation(num_samples)
    return MixPlan.singles(num_samples, epoch=epoch, seed=seed, order=order).shard(rank,
                                                                                  world_size)


class RemoteService:
    """:class:`~mixpipe.server.base.SelectionService` over ZeroMQ; see the module docstring.

    One client may be shared by threads (calls are serialised); processes each connect their own.
    """

    def __init__(self, url: str, timeout: float = 10.0, retries: int = 2,
                 num_samples: Optional[int] = None, seed: Optional[int] = None,
                 context: Optional[zmq.Context] = None, keys: Any = None,
                 connect_timeout: Optional[float] = None, wait: float = 1800.0) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if connect_timeout is not None and not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be > 0 seconds, got {connect_timeout}")
        if not wait >= 0:
            raise ValueError(f"wait must be >= 0 seconds, got {wait}")
        self.url = check_url(url)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.connect_timeout = float(connect_timeout) if connect_timeout is not None else None
        self.wait = float(wait)
        self.keys: Optional[ClientKeys] = client_keys(keys)
        self._monitor: Optional[zmq.Socket] = None
        self._handshaken = False
        self._refused: Optional[str] = None
        self._num_samples = None if num_samples is None else int(num_samples)
        self._seed = seed
        self._ctx = context or zmq.Context.instance()
        self._sock: Optional[zmq.Socket] = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._client = uuid.uuid4().hex
        self._warned = False
        self.fallbacks = 0

    # ----------------------------------------------------------------------------- transport
    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDTIMEO, int(self.timeout * 1000))
            if self.keys is not None:
                apply_client(sock, self.keys)
            # the monitor tells "nobody listens" and "handshake refused" apart from "slow"
            self._monitor = sock.get_monitor_socket(_EVENTS)
            self._handshaken, self._refused = False, None
            try:
                sock.connect(self.url)
            except zmq.ZMQError as err:
                self._sock = sock
                self._drop_socket()
                raise ValueError(f"cannot connect to {self.url!r}: {err} (use "
                                 "tcp://HOST:PORT)") from None
            self._sock = sock
        return self._sock

    def _drop_socket(self) -> None:
        if self._sock is not None:
            if self._monitor is not None:
                try:
                    self._sock.disable_monitor()
                except zmq.ZMQError:
                    pass
                self._monitor.close(linger=0)
                self._monitor = None
            self._sock.close(linger=0)
            self._sock = None

    def _watch(self) -> None:
        """Read the socket's connection events: note a handshake, or why it failed."""
        while self._monitor is not None:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshaken = True
            elif self._refused is not None or kind not in _REFUSED:
                continue  # the first refusal names the cause
            elif self.keys is None:
                self._refused = "expects CURVE keys and this client has none: pass keys= or " \
                    "set MIXPIPE_KEYS"
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._refused = "refused this client's CURVE key: use a client key the server " \
                    "authorises (its key directory, MIXPIPE_KEYS)"
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                self._refused = "runs without keys but this client uses CURVE: start the " \
                    "server with the same keys (mixpipe serve --keys DIR)"
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self._refused = "failed the CURVE handshake: the server public key this client " \
                    "was given is not the server's"

    def close(self) -> None:
        with self._lock:
            self._drop_socket()

    def __enter__(self) -> "RemoteService":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _request(self, op: Op, meta: Dict[str, Any],
                 buffers: Sequence[Any] = ()) -> Tuple[Dict[str, Any], List[Any]]:
        with self._lock:
            request_id = next(self._ids)
            message = encode(op, request_id, {**meta, "client": self._client}, buffers)
            started = time.monotonic()
            never_connected = True
            for attempt in range(self.retries + 1):
                reply = self._attempt(message, request_id)
                never_connected &= not self._handshaken
                if reply is not None:
                    break
                self._drop_socket()  # lazy pirate: a fresh socket for the retry
                log.debug("no reply from %s (attempt %d/%d)", self.url, attempt + 1,
                          self.retries + 1)
            else:
                spent = time.monotonic() - started
                if never_connected:
                    raise ServerUnavailable(
                        f"no selection server at {self.url}: nothing accepted a connection in "
                        f"{spent:.1f} s ({self.retries + 1} attempts of {self._connect_wait():g}"
                        " s); start `mixpipe serve` there or fix the address")
                raise ServerUnavailable(f"selection server {self.url} did not reply within "
                                        f"{self.timeout:g} s ({self.retries + 1} attempts)")
        _op, status, _rid, reply_meta, frames = reply
        if status == Status.ERROR:
            message_text = reply_meta.get("error", "unknown server error")
            kind = reply_meta.get("kind")
            if kind == "PlanNotReady":
                raise _NotReady(message_text)
            raise _SERVER_ERRORS.get(kind, ValueError)(message_text)
        self._learn(reply_meta)
        return reply_meta, frames

    def _connect_wait(self) -> float:
        return min(self.timeout, 5.0 if self.connect_timeout is None else self.connect_timeout)

    def _attempt(self, message: List[Any], request_id: int) -> Optional[tuple]:
        sock = self._socket()
        try:
            sock.send_multipart(message, copy=False)
        except zmq.Again:
            return None
        start = time.monotonic()
        deadline = start + self.timeout
        connect_deadline = start + self._connect_wait()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        while True:
            self._watch()
            if self._refused is not None:
                reason = self._refused
                self._drop_socket()
                raise ServerRefused(f"selection server {self.url} {reason}")
            now = time.monotonic()
            end = deadline if self._handshaken else min(deadline, connect_deadline)
            if now >= end:
                return None
            ready = dict(poller.poll(int((end - now) * 1000) + 1))
            if sock not in ready:
                continue
            frames = sock.recv_multipart(copy=False)
            try:
                reply = decode([f.buffer for f in frames])
            except ProtocolError as err:
                log.warning("ignoring a malformed reply from %s: %s", self.url, err)
                continue
            if reply[2] == request_id:
                return reply
            # a late reply to an attempt given up on: not ours any more

    def _learn(self, meta: Dict[str, Any]) -> None:
        if self._num_samples is None and isinstance(meta.get("num_samples"), int):
            self._num_samples = meta["num_samples"]
        if self._seed is None and isinstance(meta.get("seed"), int):
            self._seed = meta["seed"]

    # ----------------------------------------------------------------------------- interface
    @property
    def num_samples(self) -> int:
        """The dataset size: given to :func:`connect`, or asked of the server once.

        If it was not given and the server is unreachable this raises
        :class:`ServerUnavailable`, also from ``isinstance(client, SelectionService)`` on Python
        < 3.12 (whose protocol check reads the attribute).
        """
        if self._num_samples is None:
            self.hello()
        return int(self._num_samples)  # type: ignore[arg-type]

    def hello(self) -> Dict[str, Any]:
        """The server's dataset size, seed, policy settings and committed epoch."""
        meta, _ = self._request(Op.HELLO, {})
        return meta

    def report(self, epoch: int, ids: Any, losses: Any, rank: int = 0) -> None:
        ids_dtype, ids = array_meta(np.asarray(ids))
        losses_dtype, losses = array_meta(np.asarray(losses))
        if ids.ndim != 1 or losses.ndim != 1:  # the wire carries flat buffers only
            raise ValueError(f"ids and losses must be 1-D, got shapes {ids.shape} and "
                             f"{losses.shape}")
        self._request(Op.REPORT, {"epoch": epoch, "rank": rank, "ids_dtype": ids_dtype,
                                  "losses_dtype": losses_dtype}, [ids, losses])

    def commit(self, epoch: int) -> None:
        self._request(Op.COMMIT, {"epoch": epoch})

    def set_labels(self, labels: Any) -> None:
        """Every sample's class, for policies that read it (``assist``)."""
        labels_dtype, labels = array_meta(np.asarray(labels))
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
        self._request(Op.SET_LABELS, {"labels_dtype": labels_dtype}, [labels])

    def end_epoch(self, epoch: int, rank: int, world_size: int) -> None:
        """This rank has delivered every report of ``epoch`` (trainers without a barrier);
        the server commits the epoch when every rank has said so."""
        self._request(Op.END_EPOCH, {"epoch": epoch, "rank": rank, "world_size": world_size})

    def plan(self, epoch: int, rank: int = 0, world_size: int = 1) -> MixPlan:
        try:
            frames = self._plan_frames(epoch, rank, world_size)
        except ServerUnavailable as err:
            if self._num_samples is None:
                raise ServerUnavailable(f"{err}; no fallback plan either, since the dataset "
                                        "size is unknown: pass num_samples= to connect()") \
                    from None
            self.fallbacks += 1
            if not self._warned:
                self._warned = True
                warnings.warn(f"{err}: training continues without mixing (fallback plans) "
                              "until it is back", ServerUnavailableWarning, stacklevel=2)
            return fallback_plan(self._num_samples, epoch, self._seed or 0, rank, world_size)
        if len(frames) != 1:
            raise ProtocolError(f"plan reply needs 1 data frame, got {len(frames)}")
        return MixPlan.from_bytes(frames[0])

    def _plan_frames(self, epoch: int, rank: int, world_size: int) -> List[Any]:
        """Ask until the plan is ready (other ranks still in the previous epoch: poll)."""
        deadline = time.monotonic() + self.wait
        pause = 0.01
        while True:
            try:
                return self._request(Op.PLAN, {"epoch": epoch, "rank": rank,
                                               "world_size": world_size})[1]
            except _NotReady as err:
                if time.monotonic() + pause > deadline:
                    raise TimeoutError(f"{err} within {self.wait:g} s: a rank died or is stuck "
                                       "(or raise connect(wait=...))") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.5)

    def stats(self) -> Dict[str, Any]:
        meta, _ = self._request(Op.STATS, {})
        return meta

    def state_dict(self) -> Dict[str, Any]:
        meta, frames = self._request(Op.STATE_DICT, {})
        state = state_from_wire(meta, frames)
        for item in state["pending"].values():  # own the memory, not the message's
            item["ids"] = item["ids"].copy()
            item["losses"] = item["losses"].copy()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        meta, frames = state_to_wire(state)
        self._request(Op.LOAD_STATE, {"state": meta}, frames)


def connect(url: str, timeout: float = 10.0, retries: int = 2,
            num_samples: Optional[int] = None, seed: Optional[int] = None, keys: Any = None,
            connect_timeout: Optional[float] = None, wait: float = 1800.0) -> RemoteService:
    """A :class:`RemoteService` for ``url`` (e.g. ``tcp://127.0.0.1:5555``).

    Nothing is sent until the first call; a malformed address is refused here. ``num_samples``
    (and ``seed``) make the no-mixing fallback plan possible even if the server is never
    reached; otherwise both are learned from the first reply. ``keys``: a key directory or
    :class:`~mixpipe.server.keys.ClientKeys` (default: the environment, see the module
    docstring). ``connect_timeout``: how long an attempt waits for anyone to accept the
    connection (default ``min(timeout, 5)``). ``wait``: how long ``plan`` waits for the other
    ranks to finish the previous epoch.
    """
    return RemoteService(url, timeout=timeout, retries=retries, num_samples=num_samples,
                         seed=seed, keys=keys, connect_timeout=connect_timeout, wait=wait)


class _NotReady(Exception):
    """The server's "ask again": other ranks have not finished the previous epoch."""
