"""MQTT transport: paho-mqtt 2.x, QoS 1, persistent session, Last Will.

The network thread only enqueues what arrives; a dispatcher thread decodes frames, reassembles
messages and files them in a :class:`~hiertrain.net.mailbox.Mailbox` (tensor topics) or in
:attr:`Transport.events` (JSON topics). Workers take messages by (kind, sender, iteration,
layer) with a timeout that raises :class:`~hiertrain.errors.MissingMessage`.

Anything malformed, unauthorized or duplicate is dropped with a logged reason and counted in
:attr:`Transport.dropped`; nothing arriving can stop the transport.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import socket
import threading
import time
from typing import Any, Callable, Optional

import paho.mqtt.client as mqtt

from hiertrain import TIERS
from hiertrain.net import topics
from hiertrain.errors import TransportError
from hiertrain.net.endpoint import Endpoint
from hiertrain.net.inbound import MIN_RATE_BYTES, Event, Inbound
from hiertrain.net.mailbox import NOT_BACK, Mailbox
from hiertrain.net.membership import Membership
from hiertrain.net.outbound import Outbound
from hiertrain.net.wire import DEFAULT_CHUNK_BYTES, MAX_TENSOR_BYTES, MIN_CHUNK_BYTES, Message, encode_message

log = logging.getLogger("hiertrain.net.transport")


# A message big enough to measure a rate from goes in at least this many frames (a rate is measured
# between a message's first and last frame): uint8 samples of a small batch fit one 256 KB frame.
# Only every RATE_EVERY-th iteration's messages are split so: each frame costs both ends a
# publication (on a Pi, a fraction of a millisecond), and the planner needs a rate now and then.
RATE_FRAMES = 4
RATE_EVERY = 4
# A bulk message (the device's prefetched samples) goes out in frames this small, one at a
# time: the next leaves when the broker acknowledged the last, so activations and gradients sent
# meanwhile wait behind one such frame at most (at 5 Mbit/s, 52 ms), not behind the whole message.
BULK_CHUNK_BYTES = 32 << 10
SWITCH_AFTER_S = 5.0  # without a broker this long, try the next one (the standby, when configured)
REJOIN_GRACE_S = 12.0  # after joining a broker without our session, peers not heard from by then are lost


class Transport:
    """One account's connection to the broker.

    Tiers receive the tensors addressed to them automatically; JSON topics are subscribed with
    :meth:`subscribe` and arrive on :attr:`events`. An *observer* (e.g. ``schedule watch``) uses
    an account's credentials to read only: no inbox, no status, no Last Will, clean session.
    """

    def __init__(self, endpoint: Endpoint, *, account: str, job: str, client_id: Optional[str] = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, persistent: bool = True,
                 observer: bool = False, keepalive: int = 30,
                 validator: Optional[Callable[[Message], Optional[str]]] = None,
                 max_message_bytes: int = MAX_TENSOR_BYTES, expire_s: float = 600.0,
                 peers: Optional[frozenset[str]] = frozenset(TIERS)) -> None:
        """``peers``: the accounts whose statuses say who is online and lost (``None``: every tier and
        enrolled device, as a fleet's coordinator follows them); an enrolled device's name is an
        account of its own."""
        self.account = topics.validate_account(account, enrolled=True)
        self.peers = peers
        self.job = topics.validate_job(job)
        self.endpoint = endpoint
        self.chunk_bytes = chunk_bytes
        self.validator = validator
        self.status_extra: dict[str, Any] = {}  # merged into every status we publish (e.g. a checkpoint)
        self.mailbox = Mailbox()
        self.received_messages = 0
        self._inbound: "queue.Queue[Optional[tuple[mqtt.MQTTMessage, float]]]" = queue.Queue()
        self._ids = itertools.count()
        self._nonce = os.urandom(4).hex()
        self._started = round(time.time(), 3)  # statuses say when this process began: the newest wins
        self._filters: set[str] = set()
        self._connected = threading.Event()
        self._refused: Optional[str] = None
        self._lock = threading.Lock()
        self._connects = 0
        self._joined: Optional[tuple[str, int]] = None  # the broker (host, port) we last connected to
        self._brokers = endpoint.brokers()
        self._broker = 0  # which of them we use
        self._down_since: Optional[float] = None
        self._ticked = 0.0
        self._status = None if observer else topics.status(job, account)
        self.members = Membership(self.account, lambda: self.mailbox, own=None if observer else
                                  (f"{self._nonce}:0", self._started),
                                  on_own_replaced=lambda: self.publish_status("online"), on_reconnected=self._resend_to)
        self.errors = self.members.errors  # peer -> the error its newest "failed" status gave
        self.inbound = Inbound(self.account, self.job, self.members, lambda: self.mailbox, follows=self._follows,
                               validator=validator, max_message_bytes=max_message_bytes, expire_s=expire_s)
        self.events, self.service, self.dropped = self.inbound.events, self.inbound.service, self.inbound.dropped
        if observer:
            persistent = False
            client_id = client_id or f"hiertrain-{job}-{account}-observer-{os.getpid()}-{self._nonce}"

        self._persistent = persistent
        self._client_id = client_id or f"hiertrain-{job}-{account}"
        self._client = self._new_client(clean_session=not persistent)
        if self._status:
            self._client.will_set(self._status, json.dumps({"state": "offline", "session": f"{self._nonce}:will",
                                                            "started": self._started}), qos=1, retain=True)
        self.outbound = Outbound(self._client, account=self.account)  # what leaves
        self._client.reconnect_delay_set(min_delay=1, max_delay=8)
        self._client.max_queued_messages_set(0)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self.outbound.on_published
        self._client.on_socket_open = _no_delay
        self._keepalive = keepalive
        self._dispatcher = threading.Thread(target=self._dispatch, name=f"hiertrain-{account}-dispatch",
                                            daemon=True)
        if account not in ("planner", "observer") and not observer:
            self._filters.add(topics.inbox(job, account))

    # -------------------------------------------------------------- lifecycle

    def _new_client(self, *, clean_session: bool) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self._client_id,
                             clean_session=clean_session, protocol=mqtt.MQTTv311)
        client.username_pw_set(self.endpoint.username, self.endpoint.password)
        if self.endpoint.tls_ca:
            client.tls_set(ca_certs=self.endpoint.tls_ca)
        return client

    def _wipe_session(self, timeout: float) -> None:
        """Start from an empty session: what a previous process left queued is not ours."""
        done = threading.Event()
        c = self._new_client(clean_session=True)
        c.on_connect = lambda *a: done.set()
        try:
            c.connect(self.endpoint.host, self.endpoint.port)
            c.loop_start()
            done.wait(timeout)
            c.disconnect()
            c.loop_stop()
        except OSError:
            pass  # start() reports an unreachable broker

    def start(self, timeout: float = 10.0) -> "Transport":
        """Connect, subscribe, announce ``online``; raise :class:`TransportError` if refused.

        A persistent session starts empty (a fresh process owes nothing to the last one) and then
        survives disconnections: QoS-1 messages sent while we reconnect are kept by the broker.
        """
        if self._persistent:
            self._wipe_session(timeout)
        self._dispatcher.start()
        try:
            self._client.connect(*self._brokers[self._broker], keepalive=self._keepalive)
        except OSError as exc:
            raise TransportError(
                f"cannot reach the broker at {self.endpoint.host}:{self.endpoint.port}: {exc}") from None
        self._client.loop_start()
        deadline = time.monotonic() + timeout
        while not self._connected.wait(0.05):
            if self._refused or time.monotonic() > deadline:
                self._client.loop_stop()
                self._inbound.put(None)
                why = self._refused or f"no answer within {timeout:g} s"
                raise TransportError(
                    f"broker at {self.endpoint.host}:{self.endpoint.port} refused account "
                    f"{self.account!r} (user {self.endpoint.username!r}): {why}")
        if self._status:
            self.publish_status("online", pid=os.getpid())
        return self

    def publish_status(self, state: str, **fields: Any) -> None:
        if self._status:
            self.publish_json(self._status, {"state": state, **self.status_extra, **fields,
                                             "session": f"{self._nonce}:{self._connects}",
                                             "started": self._started}, retain=True)

    def announce(self, **fields: Any) -> None:
        """Add ``fields`` to our status and publish it (e.g. the newest checkpoint we hold)."""
        self.status_extra.update(fields)
        self.publish_status("online")

    def stop(self, *, state: str = "stopped", timeout: float = 5.0) -> None:
        """Flush what is queued, announce ``state`` and disconnect."""
        try:
            if self._connected.is_set():
                self.publish_status(state)
                self.flush(timeout)
        finally:
            self._client.disconnect()
            self._client.loop_stop()
            self._inbound.put(None)
            self._dispatcher.join(timeout)

    def __enter__(self) -> "Transport":
        return self.start()

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.stop(state="failed" if exc_type else "stopped")

    def subscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._filters.add(topic_filter)
        if self._connected.is_set():
            self._client.subscribe(topic_filter, qos=1)

    # -------------------------------------------------------------- sending

    def send(self, msg: Message, *, bulk: bool = False, topic: Optional[str] = None) -> int:
        """Publish ``msg`` in frames on its tensor topic (QoS 1; ``topic``: a hierarchical job's sync
        topic instead); return the bytes queued. ``bulk``: behind every other message (see :data:`BULK_CHUNK_BYTES`)."""
        if msg.sender != self.account or msg.job != self.job:
            raise TransportError(f"account {self.account!r} of job {self.job!r} cannot send {msg.describe()} "
                                 f"of job {msg.job!r}")
        size = sum(a.nbytes for a in msg.tensors.values())
        chunk = self.chunk_bytes
        if msg.iteration % RATE_EVERY == 0 and size * (RATE_FRAMES - 1) >= MIN_RATE_BYTES * RATE_FRAMES:
            chunk = min(chunk, max(MIN_CHUNK_BYTES, -(-size // RATE_FRAMES)))
        if bulk:
            chunk = min(chunk, BULK_CHUNK_BYTES)
        frames = encode_message(msg, msg_id=f"{self._nonce}:{next(self._ids)}", chunk_bytes=chunk)
        return self.outbound.frames(topic or msg.topic, frames, iteration=msg.iteration,
                                    keep=msg.kind not in self.service and topic is None, bulk=bulk)

    def publish_json(self, topic: str, payload: Any, *, retain: bool = False) -> None:
        self.outbound.publish_json(topic, payload, retain=retain)

    @property
    def sent_bytes(self) -> int:
        return self.outbound.sent_bytes

    @property
    def sent_messages(self) -> int:
        return self.outbound.sent_messages

    def advance(self, iteration: int) -> None:
        """The owner moved on to ``iteration``: older messages are stale, and frames of iterations
        before ``iteration - 1`` need no resending after a broker crash."""
        self.mailbox.advance(iteration)
        self.outbound.trim(iteration)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until the broker acknowledged everything published so far (bulk frames included)."""
        self.outbound.flush(timeout)

    # -------------------------------------------------------------- receiving

    def renew_mailbox(self, *, retire: str) -> None:
        """A failover: an empty mailbox that refuses the ``retire``d run (and those retired before)."""
        old = self.mailbox
        self.mailbox = Mailbox(window=old.window, retired=old.retired | {retire})
        for msg in old.parked.values():  # the device's new run, which the old mailbox did not follow
            self.mailbox.put(msg)
        self.outbound.forget_recent()  # never sent again: the abandoned attempt's frames
        # peers still to reappear are the device's to judge now: it starts the next run knowing
        # who is there, and a later "not back" here would abandon that run under it
        self.members.forget_unheard()

    def take(self, kind: str, sender: str, iteration: int, layer: int, timeout: float) -> Message:
        """The message ``kind`` from ``sender`` for (iteration, layer); see :meth:`Mailbox.take`."""
        return self.mailbox.take(kind, sender, iteration, layer, timeout)

    def take_rates(self) -> dict[str, float]:
        """Mbit/s at which multi-frame messages from each sender streamed in since the last call."""
        return self.inbound.take_rates()

    @property
    def received_bytes(self) -> int:
        return self.inbound.received_bytes

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            client.disconnect()
            return
        with self._lock:
            filters = sorted(self._filters)
        for f in filters:
            client.subscribe(f, qos=1)
        self._connects += 1
        dropped, self._down_since = self._down_since is not None, None
        joined = (client._host, client._port)  # noqa: SLF001 - where this connection went (the switch sets them)
        if self._joined is not None and joined != self._joined:
            self.members.moved_broker()
        self._joined = joined
        if self._connects > 1 and not getattr(flags, "session_present", True):
            self.members.rejoined(REJOIN_GRACE_S)  # every peer to be heard from here, else lost with the old one
            self._republish(client, "the broker lost our session (restarted?)")
        elif self._connects > 1 and dropped:
            # Our session is there, but it may be the broker's last save (autosave_interval) after a
            # crash, without what we published since: publish it again all the same.
            self._republish(client, "back on the broker after losing it; it may have restarted from its last save")
        self._connected.set()

    def _resend_to(self, peer: str) -> None:
        if self.outbound.send_again(self._client, to=peer):
            log.info("%s: %s announced a new session; sent it again what it may have lost", self.account, peer)

    def _republish(self, client: mqtt.Client, why: str) -> None:
        """The broker came back and may have lost what it held (it crashed): publish again what
        it may have lost. Receivers drop what they already have as duplicates."""
        retained = self.outbound.republish_retained(client, but=self._status)
        self.publish_status("online")  # a new session: peers send us again what we may have lost
        recent = self.outbound.send_again(client)
        log.warning("%s: %s; published again %d retained and %d recent messages", self.account, why, retained,
                    recent)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connected.clear()
        if reason.is_failure:
            if self._down_since is None:
                self._down_since = time.monotonic()
            log.warning("%s: disconnected from the broker (%s); reconnecting", self.account, reason)

    def _tick(self) -> None:
        """Twice a second, from the dispatcher: move to the next broker after :data:`SWITCH_AFTER_S`
        without one; once :data:`REJOIN_GRACE_S` passed after joining a broker that did not have our
        session, take every peer not heard from as lost (it went down with the old broker)."""
        now = time.monotonic()
        if now - self._ticked < 0.5:
            return
        self._ticked = now
        if self.outbound.bulk_waiting:
            self.outbound.pump_bulk()  # should an acknowledgement have gone missing
        down = self._down_since
        if down is not None and len(self._brokers) > 1 and now - down > SWITCH_AFTER_S:
            nxt = (self._broker + 1) % len(self._brokers)
            (old_host, old_port), (host, port) = self._brokers[self._broker], self._brokers[nxt]
            # paho's setters refuse while its loop still retries the lost broker; the retries read these
            self._client._host, self._client._port = host, port  # noqa: SLF001
            self._broker, self._down_since = nxt, now
            log.warning("%s: no broker at %s:%d for %.0f s; trying %s:%d", self.account, old_host, old_port,
                        now - down, host, port)
        for peer in self.members.not_back(now):
            if self.members.run_without(self.mailbox.run, peer):  # the run we follow was started without it
                continue
            log.warning("%s: the %s did not come back within %.0f s of our joining this broker", self.account,
                        peer, REJOIN_GRACE_S)
            self.mailbox.lose(peer, NOT_BACK)
            # as if its Last Will had reached us (it could not: it went down with the old broker)
            self.events.put(Event(topics.AccountTopic(self.job, peer, "status"), {"state": "offline", "why": NOT_BACK},
                                  retained=False))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.received_messages += 1
        self._inbound.put((message, time.monotonic()))  # the network thread does nothing else

    def _dispatch(self) -> None:
        while True:
            self._tick()
            try:
                item = self._inbound.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            message, at = item
            self.inbound.handle(message.topic, message.payload, bool(message.retain), at)

    def _follows(self, account: str) -> bool:
        return account in self.peers if self.peers is not None else account not in ("planner", "observer")

    def online(self) -> set[str]:
        """The peers whose newest status says online."""
        return self.members.online()

    def builders(self) -> set[str]:
        """The online peers that build segments for others (:class:`hiertrain.train.artifacts.Supply`)."""
        return self.members.builders()

    def collectors(self) -> set[str]:
        """The online peers that collect every checkpoint (:mod:`hiertrain.train.collect`)."""
        return self.members.collectors()

    def announced(self) -> dict[str, int]:
        """The online peers' newest checkpoints, as their statuses announce them."""
        return self.members.announced()

def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    # paho leaves Nagle on: small frames (acks, gradients) would wait ~40 ms for delayed ACKs.
    if hasattr(sock, "setsockopt"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
