"""Tensors and messages on the wire: msgpack headers and raw little-endian array bytes.

Nothing here is ever unpickled. A tensor is described by (dtype, shape) from a whitelist and its
raw bytes, whose length must equal ``prod(shape) * itemsize``. Every decode failure raises
:class:`WireError` naming what was wrong.

Standalone tensors (:func:`encode_tensor`) are a msgpack array ``[dtype, shape, bytes]``.

Messages between tiers (:class:`Message`) are split into *frames* of at most ``chunk_bytes`` of
payload, so that a large tensor streams through the broker instead of being stored and forwarded
whole. A frame is::

    b"HTW" + version byte | uint32 header length | msgpack header | payload slice

and the payload of a whole message is::

    uint32 header length | msgpack {"t": [[name, dtype, shape], ...], "m": meta} | raw arrays

All arrays of one message are concatenated in order, so encoding costs one copy of the data and
decoding none for single-frame messages (arrays are views of the received bytes).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import msgpack
import numpy as np

from hiertrain.net import topics
from hiertrain.errors import TopicError, WireError

SCHEMA_VERSION = 1
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<") for name in ("float32", "float16", "int64", "int32", "uint8")
}
MAX_NDIM = 8
MAX_TENSOR_BYTES = 1 << 30
MAX_MESSAGE_BYTES = 2 << 30
MAX_HEADER_BYTES = 1 << 16
MAX_TENSORS = 4096
MAX_INT = (1 << 53) - 1
DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 1 << 10
_MAGIC = b"HTW" + bytes([SCHEMA_VERSION])
_U32 = struct.Struct("<I")
_LIMITS = dict(
    max_bin_len=MAX_TENSOR_BYTES, max_str_len=1 << 16, max_array_len=1 << 16,
    max_map_len=1 << 12, max_ext_len=0,
)
_SCALARS = (str, int, float, bool, type(None))


# ---------------------------------------------------------------------------------- arrays

def _describe(array: Any) -> tuple[np.ndarray, str, list[int]]:
    """Validate an outgoing array; return it C-contiguous little-endian, its dtype name and shape."""
    a = np.asarray(array)
    name = a.dtype.name
    if name not in DTYPES:
        raise WireError(f"dtype {a.dtype} cannot go on the wire; allowed: {', '.join(DTYPES)}")
    if a.ndim > MAX_NDIM:
        raise WireError(f"array has {a.ndim} dimensions; at most {MAX_NDIM} go on the wire")
    if a.nbytes > MAX_TENSOR_BYTES:
        raise WireError(f"array of {a.nbytes} bytes exceeds the {MAX_TENSOR_BYTES}-byte ceiling")
    a = np.asarray(a, dtype=DTYPES[name], order="C")  # (ascontiguousarray would make 0-d 1-d)
    return a, name, list(a.shape)


def _raw(a: np.ndarray) -> memoryview:
    return memoryview(a.reshape(-1).view(np.uint8)) if a.size else memoryview(b"")


def _checked_layout(dtype: Any, shape: Any) -> tuple[np.dtype, tuple[int, ...], int]:
    """Validate an incoming (dtype, shape); return the numpy dtype, shape and byte count."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise WireError(f"dtype {dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM:
        raise WireError(f"shape {shape!r} is not a list of at most {MAX_NDIM} sizes")
    if not all(type(d) is int and 0 <= d <= MAX_INT for d in shape):
        raise WireError(f"shape {shape!r} has a size that is not a non-negative integer")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if nbytes > MAX_TENSOR_BYTES:
        raise WireError(f"shape {shape!r} of {dtype} needs {nbytes} bytes, over the {MAX_TENSOR_BYTES}-byte ceiling")
    return DTYPES[dtype], tuple(shape), nbytes


def _array(buffer: Any, dtype: np.dtype, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
    count = math.prod(shape)
    return np.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(shape)


def encode_tensor(array: Any) -> bytes:
    """Encode one array (float32, float16, int64, int32 or uint8; any shape) as msgpack bytes."""
    a, name, shape = _describe(array)
    return msgpack.packb([name, shape, _raw(a)], use_bin_type=True)


def decode_tensor(data: bytes) -> np.ndarray:
    """Decode :func:`encode_tensor`'s bytes; the result is a read-only view of ``data``.

    Raises :class:`WireError`, and only that, for any input that is not a valid tensor.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=True, **_LIMITS)
    except Exception as exc:  # msgpack raises several unrelated types for malformed input
        raise WireError(f"not a msgpack tensor: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, list) or len(obj) != 3:
        raise WireError("a tensor is a msgpack array [dtype, shape, bytes]")
    dtype, shape, raw = obj
    dt, shp, nbytes = _checked_layout(dtype, shape)
    if not isinstance(raw, bytes) or len(raw) != nbytes:
        got = len(raw) if isinstance(raw, bytes) else type(raw).__name__
        raise WireError(f"tensor {dtype}{list(shp)} needs {nbytes} data bytes, got {got}")
    return _array(raw, dt, shp)


# -------------------------------------------------------------------------------- messages

@dataclass(frozen=True)
class Message:
    """Named tensors from one tier to another for one (iteration, layer).

    ``meta`` carries a few scalars (or lists of scalars) beside the tensors, e.g. a loss.
    """

    kind: str
    job: str
    sender: str
    dest: str
    iteration: int
    layer: int
    tensors: Mapping[str, np.ndarray]
    schedule_version: int = 0
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            topics.TensorTopic(self.job, self.sender, self.kind, self.dest, self.layer)
        except TopicError as exc:
            raise WireError(str(exc)) from None
        for what in ("iteration", "schedule_version"):
            v = getattr(self, what)
            if type(v) is not int or not 0 <= v <= MAX_INT:
                raise WireError(f"{what} must be a non-negative integer, got {v!r}")
        _check_meta(self.meta)

    @property
    def key(self) -> tuple[str, int, int, str]:
        """What replies are matched by: (kind, iteration, layer, sender)."""
        return (self.kind, self.iteration, self.layer, self.sender)

    @property
    def topic(self) -> str:
        return topics.tensor(self.job, self.sender, self.kind, self.dest, self.layer)

    def describe(self) -> str:
        return f"{self.kind} {self.sender}->{self.dest} iteration {self.iteration} layer {self.layer}"


def _check_meta(meta: Any) -> None:
    if not isinstance(meta, Mapping) or len(meta) > 64:
        raise WireError("meta must be a mapping of at most 64 entries")
    for k, v in meta.items():
        ok = isinstance(v, _SCALARS) or (isinstance(v, list) and all(isinstance(x, _SCALARS) for x in v))
        if not isinstance(k, str) or not ok:
            raise WireError(f"meta entry {k!r} must map a string to a scalar or a list of scalars")


def _payload_buffers(msg: Message) -> list[memoryview]:
    descs, raws = [], []
    if len(msg.tensors) > MAX_TENSORS:
        raise WireError(f"a message carries at most {MAX_TENSORS} tensors, not {len(msg.tensors)}")
    for name, array in msg.tensors.items():
        if not isinstance(name, str):
            raise WireError(f"tensor names must be strings, got {name!r}")
        a, dtype, shape = _describe(array)
        descs.append([name, dtype, shape])
        raws.append(_raw(a))
    head = msgpack.packb({"t": descs, "m": dict(msg.meta)}, use_bin_type=True)
    if len(head) > MAX_HEADER_BYTES:
        raise WireError(f"message header of {len(head)} bytes is over {MAX_HEADER_BYTES}")
    return [memoryview(_U32.pack(len(head))), memoryview(head), *raws]


def _chunks(buffers: Sequence[memoryview], size: int) -> Iterator[list[memoryview]]:
    """Split the concatenation of ``buffers`` into pieces of ``size`` bytes, without copying."""
    piece: list[memoryview] = []
    room = size
    for buf in buffers:
        while len(buf):
            take = buf[:room]
            piece.append(take)
            buf = buf[len(take):]
            room -= len(take)
            if room == 0:
                yield piece
                piece, room = [], size
    if piece:
        yield piece


def encode_message(msg: Message, *, msg_id: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[bytes]:
    """Encode ``msg`` into frames of at most ``chunk_bytes`` payload bytes each."""
    if chunk_bytes < MIN_CHUNK_BYTES:
        raise WireError(f"chunk_bytes must be at least {MIN_CHUNK_BYTES}, got {chunk_bytes}")
    buffers = _payload_buffers(msg)
    total = sum(len(b) for b in buffers)
    if total > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {total} bytes exceeds the {MAX_MESSAGE_BYTES}-byte ceiling")
    pieces = list(_chunks(buffers, chunk_bytes))
    frames = []
    for part, piece in enumerate(pieces):
        header = msgpack.packb(
            [msg.job, msg.sender, msg.dest, msg.kind, msg.iteration, msg.layer,
             msg.schedule_version, msg_id, part, len(pieces), total],
            use_bin_type=True,
        )
        frames.append(b"".join([_MAGIC, _U32.pack(len(header)), header, *piece]))
    return frames


@dataclass(frozen=True)
class Frame:
    """One decoded frame: the routing header and a slice of the message payload."""

    job: str
    sender: str
    dest: str
    kind: str
    iteration: int
    layer: int
    schedule_version: int
    msg_id: str
    part: int
    parts: int
    total: int
    data: memoryview

    def describe(self) -> str:
        return f"{self.kind} {self.sender}->{self.dest} iteration {self.iteration} layer {self.layer}"

    @property
    def routing(self) -> tuple:
        return (self.job, self.sender, self.dest, self.kind, self.iteration, self.layer,
                self.schedule_version, self.parts, self.total)


def decode_frame(data: bytes) -> Frame:
    """Parse one frame's header; raise :class:`WireError` if it is malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    view = memoryview(data)
    if len(view) < 8 or bytes(view[:4]) != _MAGIC:
        raise WireError("not a hiertrain frame (bad magic or schema version)")
    (hlen,) = _U32.unpack(view[4:8])
    if hlen > MAX_HEADER_BYTES or 8 + hlen > len(view):
        raise WireError(f"frame header length {hlen} does not fit the {len(view)}-byte frame")
    try:
        h = msgpack.unpackb(view[8:8 + hlen], raw=False, **_LIMITS)
    except Exception as exc:
        raise WireError(f"frame header is not msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(h, list) or len(h) != 11:
        raise WireError("frame header must be an 11-item array")
    job, sender, dest, kind, iteration, layer, sv, msg_id, part, parts, total = h
    for name, v in (("iteration", iteration), ("layer", layer), ("schedule_version", sv),
                    ("part", part), ("parts", parts), ("total", total)):
        if type(v) is not int or not 0 <= v <= MAX_INT:
            raise WireError(f"frame {name} must be a non-negative integer, got {v!r}")
    if not isinstance(msg_id, str) or not 0 < len(msg_id) <= 64:
        raise WireError(f"bad frame message id {msg_id!r}")
    if not part < parts or total > MAX_MESSAGE_BYTES or parts > total // MIN_CHUNK_BYTES + 1:
        raise WireError(f"frame part {part} of {parts} for {total} bytes is inconsistent")
    try:
        topics.TensorTopic(job, sender, kind, dest, layer)
    except TopicError as exc:
        raise WireError(f"frame header: {exc}") from None
    return Frame(job, sender, dest, kind, iteration, layer, sv, msg_id, part, parts, total,
                 view[8 + hlen:])


def decode_payload(frame: Frame, payload: Any) -> Message:
    """Build the message a complete payload (all frames joined) describes."""
    view = memoryview(payload)
    if len(view) != frame.total:
        raise WireError(f"payload is {len(view)} bytes, the frames announced {frame.total}")
    if len(view) < 4:
        raise WireError("payload too short for its header length")
    (hlen,) = _U32.unpack(view[:4])
    if hlen > MAX_HEADER_BYTES or 4 + hlen > len(view):
        raise WireError(f"payload header length {hlen} does not fit the {len(view)}-byte payload")
    try:
        head = msgpack.unpackb(view[4:4 + hlen], raw=False, strict_map_key=True, **_LIMITS)
    except Exception as exc:
        raise WireError(f"payload header is not msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(head, dict) or set(head) != {"t", "m"} or not isinstance(head["t"], list):
        raise WireError("payload header must be a map with keys 't' (tensors) and 'm' (meta)")
    tensors: dict[str, np.ndarray] = {}
    offset = 4 + hlen
    for desc in head["t"]:
        if not isinstance(desc, list) or len(desc) != 3 or not isinstance(desc[0], str):
            raise WireError(f"tensor descriptor {desc!r} is not [name, dtype, shape]")
        name, dtype, shape = desc
        if name in tensors:
            raise WireError(f"tensor {name!r} appears twice")
        dt, shp, nbytes = _checked_layout(dtype, shape)
        if offset + nbytes > len(view):
            raise WireError(f"tensor {name!r} {dtype}{list(shp)} runs past the end of the payload")
        tensors[name] = _array(view, dt, shp, offset)
        offset += nbytes
    if offset != len(view):
        raise WireError(f"payload has {len(view) - offset} bytes beyond its tensors")
    return Message(frame.kind, frame.job, frame.sender, frame.dest, frame.iteration, frame.layer,
                   tensors, frame.schedule_version, head["m"])
