"""What leaves a connection: publications at QoS 1 and the broker's acknowledgements of them, bulk
frames paced one at a time, and what is kept to publish again to a broker that lost our session.

:class:`Outbound` is the sending half of :class:`hiertrain.net.transport.Transport` (the receiving
half is :mod:`hiertrain.net.inbound`). paho's network thread calls :meth:`Outbound.on_published`;
everything else runs on the caller's thread.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from typing import Any, Optional

import paho.mqtt.client as mqtt

from hiertrain.errors import TransportError


class Outbound:
    def __init__(self, client: mqtt.Client, *, account: str) -> None:
        self.client, self.account = client, account
        self.sent_bytes = 0
        self.sent_messages = 0  # MQTT publications, every frame and JSON message (telemetry: the data plane's cost)
        self._lock = threading.Lock()
        self._pending: list[mqtt.MQTTMessageInfo] = []
        self._bulk: "collections.deque[tuple[str, bytes]]" = collections.deque()  # bulk frames not yet published
        self._bulk_info: Optional[mqtt.MQTTMessageInfo] = None  # the bulk frame the broker has not acknowledged
        self._bulk_lock = threading.Lock()
        self._bulk_kick = False
        self._acked = -1  # the newest message id the broker acknowledged
        # what to publish again if the broker comes back without our session (it crashed): the
        # frames of recent iterations, and the last retained payload of each topic we retain
        self._recent: "collections.deque[tuple[int, str, list[bytes]]]" = collections.deque()
        self._retained: dict[str, str] = {}
        self._last_json: dict[str, str] = {}

    # -------------------------------------------------------------- publishing

    def frames(self, topic: str, frames: list[bytes], *, iteration: int, keep: bool, bulk: bool) -> int:
        """Publish a message's ``frames`` on ``topic``; ``keep``: to publish again should the broker lose
        them; ``bulk``: one frame at a time, behind everything else. Returns the bytes queued."""
        n = sum(len(frame) for frame in frames)
        if keep:
            with self._lock:
                self._recent.append((iteration, topic, frames))
        if bulk:
            with self._bulk_lock:
                self._bulk.extend((topic, frame) for frame in frames)
            self.pump_bulk()
        else:
            for frame in frames:
                self.publish(topic, frame)
        self.sent_bytes += n
        return n

    def publish_json(self, topic: str, payload: Any, *, retain: bool = False) -> None:
        text = json.dumps(payload, separators=(",", ":"))
        with self._lock:  # the last of each topic, retained or not (telemetry: a loss someone waits for)
            (self._retained if retain else self._last_json)[topic] = text
        self.publish(topic, text, retain=retain)

    def publish(self, topic: str, payload: Any, *, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """QoS 1; while disconnected paho queues it and sends it on reconnection."""
        try:
            info = self.client.publish(topic, payload, qos=1, retain=retain)
            self.sent_messages += 1
        except (RuntimeError, ValueError, OSError) as exc:  # paho's own failures, in one line
            raise TransportError(f"{self.account}: cannot publish on {topic!r}: {exc}") from None
        self._track(info)
        return info

    def _track(self, info: mqtt.MQTTMessageInfo) -> None:
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            return  # queued by paho for the reconnection (and kept in _recent should the broker lose it)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise TransportError(f"publish failed: {mqtt.error_string(info.rc)}")
        with self._lock:
            self._pending = [p for p in self._pending if not _published(p)]
            self._pending.append(info)

    # ------------------------------------------------------------------- bulk

    @property
    def bulk_waiting(self) -> bool:
        return bool(self._bulk)

    def pump_bulk(self, *, wait: bool = True) -> None:
        """Publish the next bulk frame if the broker acknowledged the previous one."""
        self._bulk_kick = True
        while self._bulk_kick:  # set again by a caller that found the lock taken: its holder looks again
            if not self._bulk_lock.acquire(blocking=wait):
                return
            try:
                self._bulk_kick = False
                last = self._bulk_info
                if self._bulk and (last is None or last.mid == self._acked or _published(last)):
                    self._bulk_info = self.publish(*self._bulk.popleft())
            finally:
                self._bulk_lock.release()

    def on_published(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        # paho calls this holding the lock its publish() takes: a thread holding ours may be
        # waiting in publish() for it, and then publishes the next frame itself
        # (and before it marks the message published: the mid says which one the broker acknowledged)
        self._acked = mid
        if self._bulk:
            self.pump_bulk(wait=False)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until the broker acknowledged everything published so far (bulk frames included)."""
        deadline = time.monotonic() + timeout
        while self._bulk:
            if time.monotonic() > deadline:
                raise TransportError(f"{len(self._bulk)} bulk frame(s) of {self.account!r} still queued after "
                                     f"{timeout:g} s: the broker did not acknowledge the ones before")
            self.pump_bulk()
            time.sleep(0.005)
        with self._lock:
            pending, self._pending = self._pending, []
        for info in pending:
            left = deadline - time.monotonic()
            if not _published(info) and (left <= 0 or not _wait_published(info, left)):
                raise TransportError(f"the broker did not acknowledge {len(pending)} publication(s) "
                                     f"of {self.account!r} within {timeout:g} s")

    # ----------------------------------------------------- publishing again

    def trim(self, iteration: int) -> None:
        """Frames of iterations before ``iteration - 1`` need no publishing again."""
        with self._lock:
            while self._recent and self._recent[0][0] < iteration - 1:
                self._recent.popleft()

    def forget_recent(self) -> None:
        """Never publish again what was sent so far (a failover's abandoned attempt)."""
        with self._lock:
            self._recent.clear()

    def send_again(self, client: mqtt.Client, to: Optional[str] = None) -> int:
        """Publish again our last JSON messages and the frames of recent iterations (those addressed to
        ``to``, or all); return how many messages."""
        with self._lock:
            recent = [(topic, frames) for _, topic, frames in self._recent if to is None or topic.split("/")[4] == to]
            last = dict(self._last_json)
        for topic, text in last.items():
            client.publish(topic, text, qos=1)
        for topic, frames in recent:
            for frame in frames:
                client.publish(topic, frame, qos=1)
        return len(recent)

    def republish_retained(self, client: mqtt.Client, *, but: Optional[str]) -> int:
        """A broker that may have lost what it held: drop the bulk frames not yet out (the recent frames
        published again include them) and publish again every retained payload, ``but`` one topic's."""
        with self._bulk_lock:
            self._bulk.clear()
            self._bulk_info = None
        with self._lock:
            retained = dict(self._retained)
        for topic, text in retained.items():
            if topic != but:
                client.publish(topic, text, qos=1, retain=True)
        return len(retained)


def _published(info: mqtt.MQTTMessageInfo) -> bool:
    try:
        return info.is_published()
    except (RuntimeError, ValueError):  # paho raises for a message whose connection went away
        return True  # nothing to wait for: resent on reconnection, or by us if the broker lost it


def _wait_published(info: mqtt.MQTTMessageInfo, timeout: float) -> bool:
    try:
        info.wait_for_publish(timeout)
    except (RuntimeError, ValueError):
        return False
    return _published(info)
