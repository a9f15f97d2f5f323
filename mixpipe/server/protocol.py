"""Wire format of the network selection service (ZeroMQ multipart messages).

Every message, request or reply, is::

    frame 0:  header  magic "MXSV" | version u8 | op u8 | status u8 | pad u8 | request id u64
              followed by UTF-8 JSON metadata (an object; may be empty)
    frame 1+: raw buffers (report ids and losses, a plan's bytes, a state's arrays)

Arrays travel as their raw bytes, their dtype and length in the metadata, so neither side loops
over elements and the receiver can view a frame as an array without copying. Anything that does
not parse raises :class:`ProtocolError` with a message naming the problem; the server turns it
into an error reply and carries on.
"""
from __future__ import annotations

import enum
import json
import struct
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

__all__ = ["MAGIC", "VERSION", "Op", "Status", "ProtocolError", "encode", "decode",
           "array_from_frame", "state_to_wire", "state_from_wire"]

MAGIC = b"MXSV"
VERSION = 1
HEADER = struct.Struct("<4sBBBxQ")

#: dtypes an array frame may declare: integers, floats and bools of any width and byte order
_ARRAY_KINDS = "biuf"


class Op(enum.IntEnum):
    HELLO = 1
    REPORT = 2
    COMMIT = 3
    PLAN = 4
    STATS = 5
    STATE_DICT = 6
    LOAD_STATE = 7
    SET_LABELS = 8
    END_EPOCH = 9


class Status(enum.IntEnum):
    OK = 0
    ERROR = 1


class ProtocolError(ValueError):
    """A message that is not a well-formed mixpipe request or reply."""


def encode(op: int, request_id: int, meta: Dict[str, Any], buffers: Sequence[Any] = (),
           status: int = Status.OK) -> List[Any]:
    head = HEADER.pack(MAGIC, VERSION, int(op), int(status), int(request_id))
    return [head + json.dumps(meta, separators=(",", ":")).encode(), *buffers]


def peek_request_id(frame: Any) -> int:
    """The request id of a header frame, or 0 if it is too short to hold one."""
    data = memoryview(frame)
    if len(data) < HEADER.size:
        return 0
    return HEADER.unpack_from(data, 0)[4]


def decode(frames: Sequence[Any]) -> Tuple[int, int, int, Dict[str, Any], List[Any]]:
    """(op, status, request id, metadata, buffer frames) of a message; ProtocolError if bad."""
    if not frames:
        raise ProtocolError("empty message: expected a header frame")
    head = memoryview(frames[0])
    if len(head) < HEADER.size:
        raise ProtocolError(f"header frame truncated: {len(head)} bytes, needs at least "
                            f"{HEADER.size}")
    magic, version, op, status, request_id = HEADER.unpack_from(head, 0)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r} (expected {MAGIC!r}): not a mixpipe "
                            "selection-service message")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} not supported (this side speaks "
                            f"{VERSION})")
    if status not in Status._value2member_map_:
        raise ProtocolError(f"unknown status {status}")
    # op 0 only in an error reply to a request whose own op could not be read
    if op not in Op._value2member_map_ and not (op == 0 and status == Status.ERROR):
        raise ProtocolError(f"unknown op {op} (known: "
                            f"{', '.join(f'{o.value}={o.name}' for o in Op)})")
    raw = bytes(head[HEADER.size:])
    try:
        meta = json.loads(raw.decode()) if raw else {}
    except (UnicodeDecodeError, ValueError) as err:
        raise ProtocolError(f"metadata is not valid UTF-8 JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ProtocolError(f"metadata must be a JSON object, got {type(meta).__name__}")
    return op, status, request_id, meta, list(frames[1:])


def parse_dtype(value: Any, field: str) -> np.dtype:
    if not isinstance(value, str):
        raise ProtocolError(f"{field} must be a dtype string such as '<i8', got {value!r}")
    try:
        dtype = np.dtype(value)
    except TypeError:
        raise ProtocolError(f"{field} {value!r} is not a numpy dtype") from None
    if dtype.kind not in _ARRAY_KINDS or dtype.itemsize == 0 or dtype.fields is not None:
        raise ProtocolError(f"{field} {value!r} is not a plain integer, float or bool dtype")
    return dtype


def array_from_frame(frame: Any, dtype_str: Any, field: str) -> np.ndarray:
    """View a raw buffer frame as a 1-D array (no copy); refuse a ragged or truncated frame."""
    dtype = parse_dtype(dtype_str, f"{field}_dtype")
    buf = memoryview(frame).cast("B")
    if len(buf) % dtype.itemsize:
        raise ProtocolError(f"{field} frame holds {len(buf)} bytes, not a whole number of "
                            f"{dtype.str} items of {dtype.itemsize} bytes (truncated?)")
    return np.frombuffer(buf, dtype=dtype)


def array_meta(arr: np.ndarray) -> Tuple[str, np.ndarray]:
    """(dtype string, contiguous array) ready to be sent as a frame."""
    arr = np.ascontiguousarray(arr)
    return arr.dtype.str, arr


# ----------------------------------------------------------------------------- state dicts
def state_to_wire(state: Dict[str, Any]) -> Tuple[Dict[str, Any], List[Any]]:
    """Split a service state dict into JSON metadata and raw frames."""
    meta = {k: state[k] for k in ("format", "num_samples", "seed", "settings", "committed_epoch")
            if k in state}
    if hasattr(meta.get("settings"), "to_dict"):  # a PolicySettings object
        meta["settings"] = meta["settings"].to_dict()
    frames: List[Any] = [state["ledger"]]
    pending = []
    for epoch, item in sorted(state["pending"].items()):
        ids_dtype, ids = array_meta(np.asarray(item["ids"]))
        losses_dtype, losses = array_meta(np.asarray(item["losses"]))
        pending.append({"epoch": int(epoch), "ids_dtype": ids_dtype,
                        "losses_dtype": losses_dtype})
        frames += [ids, losses]
    meta["pending"] = pending
    # optional entries (labels, a learning policy's state) follow, named in "extras"
    extras = []
    if state.get("labels") is not None:
        labels_dtype, labels = array_meta(np.asarray(state["labels"]))
        meta["labels_dtype"] = labels_dtype
        extras.append("labels")
        frames.append(labels)
    if state.get("policy_state") is not None:
        extras.append("policy_state")
        frames.append(bytes(state["policy_state"]))
    if extras:
        meta["extras"] = extras
    return meta, frames


def state_from_wire(meta: Dict[str, Any], frames: Sequence[Any]) -> Dict[str, Any]:
    if not isinstance(meta, dict):
        raise ProtocolError(f"state metadata must be an object, got {type(meta).__name__}")
    pending_meta = meta.get("pending")
    if not isinstance(pending_meta, list):
        raise ProtocolError("state metadata needs a 'pending' list")
    extras = meta.get("extras", [])
    if not isinstance(extras, list) or not set(extras) <= {"labels", "policy_state"}:
        raise ProtocolError(f"state 'extras' must list 'labels' / 'policy_state', got {extras!r}")
    if len(frames) != 1 + 2 * len(pending_meta) + len(extras):
        raise ProtocolError(f"state needs {1 + 2 * len(pending_meta) + len(extras)} data frames "
                            f"(ledger, then ids and losses per pending epoch, then "
                            f"{extras or 'no extras'}), got {len(frames)}")
    state = {k: v for k, v in meta.items() if k not in ("pending", "extras", "labels_dtype")}
    for name, frame in zip(extras, frames[1 + 2 * len(pending_meta):]):
        state[name] = array_from_frame(frame, meta.get("labels_dtype"), "labels") \
            if name == "labels" else bytes(memoryview(frame))
    state["ledger"] = bytes(memoryview(frames[0]))
    pending = {}
    for i, item in enumerate(pending_meta):
        if not isinstance(item, dict) or "epoch" not in item:
            raise ProtocolError(f"pending entry {i} must be an object with an 'epoch'")
        pending[item["epoch"]] = {
            "ids": array_from_frame(frames[1 + 2 * i], item.get("ids_dtype"), "ids"),
            "losses": array_from_frame(frames[2 + 2 * i], item.get("losses_dtype"), "losses"),
        }
    state["pending"] = pending
    return state
