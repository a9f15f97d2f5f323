"""CURVE keys of the selection server: who may talk to it (ZeroMQ's own authentication).

ZeroMQ's CURVE mechanism (CurveZMQ: Curve25519 key exchange, every message encrypted and
authenticated) is used as pyzmq offers it; nothing here is home-made cryptography. The server
has a key pair; each client has a key pair; the server accepts a client only if the client's
public key is on its list (checked by a ZAP handler, ``zmq.auth.thread.ThreadAuthenticator``),
and the client accepts the server only if it proves it holds the secret of the server public
key the client was given. A client without keys, or with a key not on the list, is refused
during the handshake, before any request reaches the service, and the refusal is logged.

Where keys come from (first match wins):

* an explicit argument: a key directory, or :class:`ServerKeys` / :class:`ClientKeys`;
* ``MIXPIPE_KEYS``: a key directory;
* the keys themselves in the environment (Z85 text, 40 characters): ``MIXPIPE_SERVER_KEY``
  (server public), ``MIXPIPE_SERVER_SECRET`` (server secret, the server only),
  ``MIXPIPE_CLIENT_KEY`` / ``MIXPIPE_CLIENT_SECRET`` (the client pair; on the server,
  ``MIXPIPE_CLIENT_KEY`` may list several public keys separated by commas).

A key directory, made by ``mixpipe serve --generate-keys DIR`` (:func:`generate_keys`)::

    server.key          server public key        (clients need it)
    server.key_secret   server key pair          (the server only)
    client.key          client public key        (the server needs it; more *.key files are
                                                  more authorised clients)
    client.key_secret   client key pair          (clients only)

The directory is created ``0700`` and the secret files ``0600``. Give the server machine
``server.key_secret`` and the clients' ``*.key``; give each client machine ``server.key`` and
``client.key_secret``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import stat
from typing import Any, Dict, Optional, Tuple, Union

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

__all__ = ["ServerKeys", "ClientKeys", "generate_keys", "new_job_keys", "server_keys",
           "client_keys", "KeysError", "Gatekeeper", "ENV_DIR", "ENV_SERVER_KEY",
           "ENV_SERVER_SECRET", "ENV_CLIENT_KEY", "ENV_CLIENT_SECRET"]

log = logging.getLogger("mixpipe.server.auth")

ENV_DIR = "MIXPIPE_KEYS"
ENV_SERVER_KEY = "MIXPIPE_SERVER_KEY"
ENV_SERVER_SECRET = "MIXPIPE_SERVER_SECRET"
ENV_CLIENT_KEY = "MIXPIPE_CLIENT_KEY"
ENV_CLIENT_SECRET = "MIXPIPE_CLIENT_SECRET"

_SERVER, _CLIENT = "server", "client"


class KeysError(ValueError):
    """Keys that are missing, malformed or unreadable (the message says which and how to fix)."""


def _check_key(value: Any, what: str) -> bytes:
    """A Z85 CURVE key (40 characters encoding 32 bytes) as bytes."""
    if isinstance(value, str):
        value = value.strip().encode("ascii", "replace")
    if not isinstance(value, bytes) or len(value) != 40:
        raise KeysError(f"{what} must be a 40-character Z85 CURVE key, got "
                        f"{len(value) if isinstance(value, (bytes, str)) else type(value).__name__}"
                        f"{' characters' if isinstance(value, (bytes, str)) else ''}; make keys "
                        "with `mixpipe serve --generate-keys DIR`")
    try:
        if len(z85.decode(value)) != 32:
            raise ValueError
    except (ValueError, KeyError, IndexError, TypeError):
        raise KeysError(f"{what} is not valid Z85 text; make keys with `mixpipe serve "
                        "--generate-keys DIR`") from None
    return value


@dataclasses.dataclass(frozen=True)
class ServerKeys:
    """The server's key pair and the public keys of the clients it accepts."""

    public: bytes
    secret: bytes
    clients: Tuple[bytes, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "public", _check_key(self.public, "server public key"))
        object.__setattr__(self, "secret", _check_key(self.secret, "server secret key"))
        clients = tuple(_check_key(c, "client public key") for c in self.clients)
        if not clients:
            raise KeysError("the server has no authorised client key: add a client's *.key to "
                            "the key directory (or set MIXPIPE_CLIENT_KEY)")
        object.__setattr__(self, "clients", clients)

    def __repr__(self) -> str:  # never print a secret
        return f"ServerKeys(public={self.public.decode()!r}, clients={len(self.clients)})"


@dataclasses.dataclass(frozen=True)
class ClientKeys:
    """What a client needs: the server's public key and its own key pair."""

    server: bytes
    public: bytes
    secret: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "server", _check_key(self.server, "server public key"))
        object.__setattr__(self, "public", _check_key(self.public, "client public key"))
        object.__setattr__(self, "secret", _check_key(self.secret, "client secret key"))

    def __repr__(self) -> str:
        return f"ClientKeys(server={self.server.decode()!r}, public={self.public.decode()!r})"

    def to_env(self) -> Dict[str, str]:
        """The environment variables that hand these keys to child processes (loader workers)."""
        return {ENV_SERVER_KEY: self.server.decode(), ENV_CLIENT_KEY: self.public.decode(),
                ENV_CLIENT_SECRET: self.secret.decode()}


def generate_keys(directory: Union[str, os.PathLike]) -> Tuple[ServerKeys, ClientKeys]:
    """Write a server and a client key pair into ``directory`` (see the module docstring).

    Refuses to overwrite existing keys: replacing them would lock out every client that has
    the old ones.
    """
    directory = os.fspath(directory)
    existing = [n for n in ("server.key", "server.key_secret", "client.key", "client.key_secret")
                if os.path.exists(os.path.join(directory, n))]
    if existing:
        raise KeysError(f"{directory} already holds keys ({', '.join(existing)}): use another "
                        "directory, or delete them to replace them")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)  # secrets below are never reachable by other users
    for name in (_SERVER, _CLIENT):
        _public, secret_file = zmq.auth.create_certificates(directory, name)
        os.chmod(secret_file, stat.S_IRUSR | stat.S_IWUSR)
    return _server_from_dir(directory), _client_from_dir(directory)


def new_job_keys() -> Tuple[ServerKeys, ClientKeys]:
    """A fresh server pair and one client pair, in memory (a torchrun job's own keys)."""
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    return (ServerKeys(server_public, server_secret, (client_public,)),
            ClientKeys(server_public, client_public, client_secret))


def _load(path: str, need_secret: bool) -> Tuple[bytes, Optional[bytes]]:
    if not os.path.exists(path):
        raise KeysError(f"key file {path} not found: make keys with `mixpipe serve "
                        "--generate-keys DIR`")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as err:
        raise KeysError(f"key file {path} is not a ZeroMQ certificate ({err})") from None
    if need_secret and not secret:
        raise KeysError(f"key file {path} holds no secret key: use the *.key_secret file")
    return public, secret


def _server_from_dir(directory: str) -> ServerKeys:
    public, secret = _load(os.path.join(directory, "server.key_secret"), True)
    clients = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".key") and name != "server.key":
            clients.append(_load(os.path.join(directory, name), False)[0])
    return ServerKeys(public, secret, tuple(clients))  # type: ignore[arg-type]


def _client_from_dir(directory: str) -> ClientKeys:
    server = _load(os.path.join(directory, "server.key"), False)[0]
    public, secret = _load(os.path.join(directory, "client.key_secret"), True)
    return ClientKeys(server, public, secret)  # type: ignore[arg-type]


def _directory(source: Any) -> Optional[str]:
    if source is None:
        source = os.environ.get(ENV_DIR) or None
    if source is None:
        return None
    source = os.fspath(source)
    if not os.path.isdir(source):
        raise KeysError(f"key directory {source} does not exist: make it with `mixpipe serve "
                        "--generate-keys DIR`")
    return source


def server_keys(source: Any = None) -> Optional[ServerKeys]:
    """The server's keys from ``source`` (a directory or :class:`ServerKeys`), else the
    environment; None when there are none (an unauthenticated server)."""
    if isinstance(source, ServerKeys):
        return source
    directory = _directory(source)
    if directory is not None:
        return _server_from_dir(directory)
    secret = os.environ.get(ENV_SERVER_SECRET)
    if not secret:
        return None
    public = os.environ.get(ENV_SERVER_KEY)
    clients = [c for c in os.environ.get(ENV_CLIENT_KEY, "").split(",") if c.strip()]
    if not public:
        raise KeysError(f"{ENV_SERVER_SECRET} is set but {ENV_SERVER_KEY} (the server public "
                        "key) is not: set both")
    return ServerKeys(public.encode(), secret.encode(), tuple(c.encode() for c in clients))


def client_keys(source: Any = None) -> Optional[ClientKeys]:
    """A client's keys from ``source`` (a directory or :class:`ClientKeys`), else the
    environment; None when there are none (the client speaks plain ZeroMQ). ``False``: none,
    whatever the environment says."""
    if source is False:
        return None
    if isinstance(source, ClientKeys):
        return source
    directory = _directory(source)
    if directory is not None:
        return _client_from_dir(directory)
    names = (ENV_SERVER_KEY, ENV_CLIENT_KEY, ENV_CLIENT_SECRET)
    values = [os.environ.get(n) for n in names]
    if not any(values) or (values[0] and not values[2] and os.environ.get(ENV_SERVER_SECRET)):
        return None  # nothing set, or only the server's own variables
    if not all(values):
        missing = [n for n, v in zip(names, values) if not v]
        raise KeysError(f"client keys in the environment are incomplete: set {', '.join(missing)}"
                        f" too (or {ENV_DIR}=DIR)")
    return ClientKeys(*(v.encode() for v in values))  # type: ignore[union-attr]


def apply_client(sock: zmq.Socket, keys: ClientKeys) -> None:
    """Make ``sock`` a CURVE client (before it connects)."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server


class _Allowlist:
    """ZAP credentials check: the client's public key must be on the list; refusals logged."""

    def __init__(self, clients: Tuple[bytes, ...], owner: "Gatekeeper") -> None:
        self.clients = frozenset(clients)
        self.owner = owner

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.clients
        if not ok:
            self.owner.refused += 1
            log.warning("refused a client from %s: its CURVE public key %s is not authorised "
                        "(add its .key file to the server's key directory)",
                        self.owner.last_address, key.decode("ascii", "replace"))
        return ok


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler thread, noting the peer address of the request it is checking so
    that a refusal can name it (the credentials callback does not receive it)."""

    def __init__(self, context: zmq.Context, owner: "Gatekeeper") -> None:
        super().__init__(context, log=logging.getLogger("mixpipe.server.auth.zap"))
        self._owner = owner

    async def handle_zap_message(self, msg: list) -> None:
        if len(msg) > 3:
            self._owner.last_address = bytes(msg[3]).decode("utf-8", "replace")
        await super().handle_zap_message(msg)


class Gatekeeper:
    """CURVE on a server socket: a ZAP handler on the socket's (own) context that accepts the
    authorised client keys only. Call :meth:`apply` before binding, :meth:`stop` at the end."""

    def __init__(self, context: zmq.Context, keys: ServerKeys) -> None:
        self.keys = keys
        self.refused = 0
        self.last_address = "?"
        self._auth = _Authenticator(context, self)
        self._auth.start()
        self._auth.configure_curve_callback("*", _Allowlist(keys.clients, self))

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_server = True
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public

    def stop(self) -> None:
        self._auth.stop()
