"""Frames back into messages (:mod:`hiertrain.net.wire` encodes them), in any order, duplicates
dropped, with memory bounded whatever a sender does."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Optional

from hiertrain.errors import WireError
from hiertrain.net.wire import MAX_TENSOR_BYTES, Frame, Message, decode_frame, decode_payload


def _stream(msg_id: str) -> str:
    """The sending process of a message id (``nonce:counter``, as :class:`~hiertrain.net.transport.Transport` makes them)."""
    return msg_id.split(":", 1)[0]


class Refused(WireError):
    """A well-formed frame that is refused to bound memory; ``str()`` starts with the reason."""


class Reassembler:
    """Collects frames into messages; tolerates any order and duplicate frames.

    :meth:`feed` returns the message a frame completes, or ``None`` (more parts to come, or a
    duplicate, counted in :attr:`duplicates`). Malformed frames raise :class:`WireError`.

    Memory is bounded whatever a sender does: a message may declare at most ``max_message_bytes``
    (beyond, :class:`Refused`); a sender keeps at most ``max_pending_per_sender`` incomplete
    messages holding at most ``max_pending_per_sender_bytes``; to make room its oldest is evicted,
    from a stream that never completed a message if there is one, so a flood of never-completed
    messages evicts itself while the real sender's in-flight ones get through; incomplete messages older than ``expire_s`` are dropped
    (:attr:`expired`), and beyond ``max_pending_bytes`` in all the oldest are evicted (:attr:`evicted`).
    """

    def __init__(self, *, max_pending_bytes: int = 4 << 30, max_message_bytes: int = MAX_TENSOR_BYTES,
                 max_pending_per_sender: int = 64, max_pending_per_sender_bytes: Optional[int] = None,
                 expire_s: float = 600.0, remember: int = 65536) -> None:
        self.max_pending_bytes = max_pending_bytes
        self.max_message_bytes = max_message_bytes
        self.max_pending_per_sender = max_pending_per_sender
        self.max_pending_per_sender_bytes = max_pending_per_sender_bytes or 2 * max_message_bytes
        self.expire_s = expire_s
        self.expired = 0
        self._per_sender: dict[str, list[int]] = {}  # sender -> [incomplete messages, bytes]
        self._proven: OrderedDict[tuple[str, str], None] = OrderedDict()  # streams that completed a message
        self._pending: OrderedDict[tuple[str, str], tuple[Frame, dict[int, memoryview]]] = OrderedDict()
        self._pending_bytes = 0
        self._done: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._remember = remember
        self.duplicates = 0
        self.evicted = 0
        self._first_seen: dict[tuple[str, str], float] = {}
        self.last_span: Optional[tuple[int, float]] = None  # (bytes after the first frame, seconds) of the last multi-frame message

    def feed(self, data: bytes, *, at: Optional[float] = None) -> Message | None:
        """Add one frame (``at``: its arrival time, to measure how fast multi-frame messages stream)."""
        frame = decode_frame(data)
        key = (frame.sender, frame.msg_id)
        if key in self._done:
            self.duplicates += 1
            return None
        if frame.total > self.max_message_bytes:
            raise Refused(f"too large: {frame.describe()} declares {frame.total} bytes, over this tier's "
                          f"{self.max_message_bytes}")
        if frame.parts == 1:
            return self._complete(key, frame, frame.data)
        now = time.monotonic() if at is None else at
        self._expire(now)
        count = self._per_sender.setdefault(frame.sender, [0, 0])
        if key not in self._pending:
            while count[0] >= self.max_pending_per_sender:
                self._evict_oldest_of(frame.sender)
            count[0] += 1
        while count[1] + len(frame.data) > self.max_pending_per_sender_bytes:
            if not self._evict_oldest_of(frame.sender, sparing=key):
                if key in self._pending:
                    self._drop(key)
                else:
                    count[0] -= 1
                raise Refused(f"too large: {frame.sender}'s message alone would exceed "
                              f"{self.max_pending_per_sender_bytes} incomplete bytes")
        self._first_seen.setdefault(key, now)
        first, parts = self._pending.get(key, (frame, {}))
        if first.routing != frame.routing:
            raise WireError(f"frame {frame.part} of message {frame.msg_id} disagrees with its first frame")
        if frame.part in parts:
            self.duplicates += 1
            return None
        parts[frame.part] = frame.data
        self._pending[key] = (first, parts)
        self._pending_bytes += len(frame.data)
        count[1] += len(frame.data)
        while self._pending_bytes > self.max_pending_bytes and len(self._pending) > 1:
            oldest = next(iter(self._pending))
            self._drop(oldest)
            self._first_seen.pop(oldest, None)
            self.evicted += 1
        if len(parts) < frame.parts:
            return None
        t0 = self._first_seen.pop(key, None)
        self._drop(key)
        if at is not None and t0 is not None and at > t0:
            self.last_span = (frame.total - len(parts[0]), at - t0)
        return self._complete(key, first, b"".join(parts[i] for i in range(frame.parts)))

    def _drop(self, key: tuple[str, str]) -> None:
        _, parts = self._pending.pop(key)
        nbytes = sum(len(p) for p in parts.values())
        self._pending_bytes -= nbytes
        count = self._per_sender[key[0]]
        count[0] -= 1
        count[1] -= nbytes
        self._first_seen.pop(key, None)

    def _evict_oldest_of(self, sender: str, sparing: Optional[tuple[str, str]] = None) -> bool:
        """Evict ``sender``'s oldest incomplete message, preferring streams (message-id prefix:
        one sending process) that never completed a message: a flood of never-completed messages
        pays for the room it takes, not the real sender's in-flight ones."""
        keys = [k for k in self._pending if k[0] == sender and k != sparing]
        if not keys:
            return False
        unproven = [k for k in keys if (k[0], _stream(k[1])) not in self._proven]
        self._drop((unproven or keys)[0])
        self.evicted += 1
        return True

    def _expire(self, now: float) -> None:
        """Drop incomplete messages whose first frame came more than ``expire_s`` ago."""
        while self._pending:
            oldest = next(iter(self._pending))
            if now - self._first_seen.get(oldest, now) <= self.expire_s:
                return
            self._drop(oldest)
            self.expired += 1

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def _complete(self, key: tuple[str, str], frame: Frame, payload: Any) -> Message:
        self._proven[(key[0], _stream(key[1]))] = None
        if len(self._proven) > 1024:
            self._proven.popitem(last=False)
        self._done[key] = None
        if len(self._done) > self._remember:
            self._done.popitem(last=False)
        return decode_payload(frame, payload)
