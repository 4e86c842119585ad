"""What arrives on a connection, on its dispatcher thread: each MQTT message decoded, checked and
filed, or dropped with its reason and counted.

JSON topics (schedule, status, telemetry, profile) become :class:`Event` s (a status first teaches
the connection's :class:`~hiertrain.net.membership.Membership`); tensor frames are reassembled into
messages, which must come on their own topic, pass the model's validator and then go to the
mailbox (an iteration's) or a service queue (segments, checkpoints: no iteration's). Malformed,
unauthorized, misrouted, retained, duplicate and expired frames are refused; so are stale statuses.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional

from hiertrain.errors import TopicError, WireError
from hiertrain.net import topics
from hiertrain.net.mailbox import Mailbox
from hiertrain.net.membership import Membership
from hiertrain.net.reassembly import Reassembler, Refused
from hiertrain.net.wire import Message

log = logging.getLogger("hiertrain.net.transport")
# A rate is measured only from a transfer this large and this long: small ones measured between
# 30 and 11,500 Mbit/s on one unshaped link (timer resolution, thread scheduling), and re-planned.
MIN_RATE_BYTES = 32 << 10
MIN_RATE_SECONDS = 0.005


@dataclass(frozen=True)
class Event:
    """A JSON message from a non-tensor topic (schedule, status, telemetry, profile)."""

    topic: topics.Topic
    payload: Any
    retained: bool


class Inbound:
    def __init__(self, account: str, job: str, members: Membership, mailbox: Callable[[], Mailbox], *,
                 follows: Callable[[str], bool], validator: Optional[Callable[[Message], Optional[str]]],
                 max_message_bytes: int, expire_s: float) -> None:
        self.account, self.job, self.members, self.mailbox, self.follows = account, job, members, mailbox, follows
        self.validator = validator
        self.events: "queue.Queue[Event]" = queue.Queue()
        # segments and checkpoints bypass the mailbox: they belong to no iteration. A checkpoint is a
        # whole model's state: a few wait at most (more are refused, counted, and the sender goes on)
        self.service: dict[str, "queue.Queue[Optional[Message]]"] = {
            k: queue.Queue(4 if k == "checkpoint" else 64) for k in topics.SERVICE_KINDS}
        self.sync: "queue.Queue[Message]" = queue.Queue(64)  # a hierarchical job's models and averages
        self.dropped: Counter[str] = Counter()
        self.received_bytes = 0
        self._rates: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._reassembler = Reassembler(max_message_bytes=max_message_bytes, expire_s=expire_s)

    def take_rates(self) -> dict[str, float]:
        """Mbit/s at which multi-frame messages from each sender streamed in since the last call."""
        with self._lock:
            rates, self._rates = self._rates, {}
        return {sender: 8 * b / t / 1e6 for sender, (b, t) in rates.items() if t > 0 and b > 0}

    def drop(self, reason: str, topic: str) -> None:
        """Count a refusal by its reason; log the 1st, 10th, 100th, ... of each reason (a flood of
        junk must not become a flood of log lines)."""
        kind, n, say = tally(self.dropped, reason)
        if say:
            log.warning("%s: dropped a message on %r: %s (%d so far for %s)", self.account, topic, reason, n, kind)

    def handle(self, topic: str, payload: bytes, retained: bool, at: float) -> None:
        """File one arrival, or drop it with its reason: nothing arriving raises here."""
        try:
            reason = self._file(topic, payload, retained, at)
        except Exception as exc:  # never let one message stop the dispatcher
            reason = f"unexpected {type(exc).__name__}: {exc}"
        if reason:
            self.drop(reason, topic)

    def _file(self, topic: str, payload: bytes, retained: bool, at: float) -> Optional[str]:
        try:
            parsed = topics.parse(topic)
        except TopicError as exc:
            return f"bad topic: {exc}"
        if parsed.job != self.job:
            return f"wrong job: {parsed.job!r}"
        if not isinstance(parsed, (topics.TensorTopic, topics.SyncTopic)):
            try:
                event = Event(parsed, json.loads(payload), retained)
            except (ValueError, UnicodeDecodeError) as exc:
                return f"malformed JSON: {exc}"
            if isinstance(parsed, topics.AccountTopic) and parsed.kind == "status" and self.follows(parsed.account) \
                    and isinstance(event.payload, dict):
                stale = self.members.status_of(parsed.account, event.payload, retained)
                if stale:
                    return stale
            self.events.put(event)
            return None
        if isinstance(parsed, topics.TensorTopic) and parsed.dest != self.account:
            return f"misrouted: addressed to {parsed.dest!r}"
        if retained:  # a leftover (or planted) frame replayed by the broker on subscribe: never ours
            return "retained: tensor frames are never taken from the broker's store"
        duplicates, expired, evicted = (self._reassembler.duplicates, self._reassembler.expired,
                                        self._reassembler.evicted)
        try:
            msg = self._reassembler.feed(payload, at=at)
        except Refused as exc:
            return str(exc)
        except WireError as exc:
            return f"malformed frame: {exc}"
        finally:
            for _ in range(self._reassembler.expired - expired):
                self.drop("expired: an incomplete message outlived its expiry", topic)
            for _ in range(self._reassembler.evicted - evicted):
                self.drop("evicted: an incomplete message made room for newer ones", topic)
        if msg is None:
            return "duplicate: frame already received" if self._reassembler.duplicates > duplicates else None
        if self._reassembler.last_span is not None:
            nbytes, seconds = self._reassembler.last_span
            self._reassembler.last_span = None
        else:
            nbytes, seconds = 0, 0.0
        if nbytes >= MIN_RATE_BYTES and seconds >= MIN_RATE_SECONDS:  # smaller: timer and scheduler noise
            with self._lock:
                b, t = self._rates.get(msg.sender, (0, 0.0))
                self._rates[msg.sender] = (b + nbytes, t + seconds)
        if isinstance(parsed, topics.SyncTopic):  # a hierarchical job's model (up) or average (down)
            want = ("edge", "cloud", parsed.site) if parsed.site else ("cloud", "edge", "")
            if (msg.kind, msg.layer, msg.sender, msg.dest, msg.meta.get("site", "")) != ("weights", 0, *want):
                return f"unauthorized: frame says {msg.describe()} of site {msg.meta.get('site')!r} but came on {topic!r}"
        elif (msg.sender, msg.kind, msg.dest, msg.layer) != (parsed.sender, parsed.kind, parsed.dest, parsed.layer):
            return f"unauthorized: frame says {msg.describe()} but came on {topic!r}"
        if self.validator is not None:
            reason = self.validator(msg)
            if reason:
                return f"{reason} ({msg.describe()})"
        self.received_bytes += sum(a.nbytes for a in msg.tensors.values())
        if isinstance(parsed, topics.SyncTopic):
            try:
                self.sync.put_nowait(msg)
            except queue.Full:
                return "too many models: the sync queue is full"
            return None
        if msg.kind in self.service:
            try:
                self.service[msg.kind].put_nowait(msg)
            except queue.Full:
                return f"too many requests: {msg.kind} queue full"
            return None
        return self.mailbox().put(msg)


def tally(counter: Counter[str], reason: str) -> tuple[str, int, bool]:
    """Count a refusal under its reason (the text before the first colon); the flag says whether
    to log it: the 1st, 10th, 100th and every 1000th, so a flood of junk is not a flood of lines."""
    kind = reason.split(":")[0]
    counter[kind] += 1
    n = counter[kind]
    return kind, n, n in (1, 10, 100) or n % 1000 == 0
