"""Who is in the job, as a connection learns it from the peers' statuses.

Every status names the process that published it (``session``: a nonce and its connection count,
``started``: when the process began). From them a connection knows which peers are online, which
build segments for others or collect checkpoints, the newest checkpoint each announces, and why a
peer failed; and it tells its mailbox when a peer is lost, back as a new process (what it held
is gone: :data:`~hiertrain.net.mailbox.RESTARTED`), or has abandoned the run we follow
(:data:`~hiertrain.net.mailbox.NEW_RUN`). A status from an earlier process than one already seen
(a Last Will that fired after its replacement started, a retained status a restarted broker kept
from before) is refused. After joining a broker that did not have our session, every peer is to
be heard from again within a grace period, or taken as lost with the old broker.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

from hiertrain.net.mailbox import NEW_RUN, RESTARTED, Mailbox

log = logging.getLogger("hiertrain.net.transport")


class Membership:
    def __init__(self, account: str, mailbox: Callable[[], Mailbox], *, own: Optional[tuple[str, float]],
                 on_own_replaced: Callable[[], None], on_reconnected: Callable[[str], None]) -> None:
        """``mailbox()``: the connection's current mailbox; ``own``: our (session, started), unless we
        only observe; ``on_own_replaced``: publish our status again (an earlier process's Last Will
        replaced it); ``on_reconnected(peer)``: send a peer again what a broker may have lost."""
        self.account, self._mailbox = account, mailbox
        self._on_own_replaced, self._on_reconnected = on_own_replaced, on_reconnected
        self._lock = threading.Lock()
        self.errors: dict[str, str] = {}  # peer -> the error its newest "failed" status gave
        self._sessions: dict[str, tuple[str, float]] = {account: own} if own else {}  # newest process seen
        self._online: set[str] = set()  # peers whose newest status says online
        self._builders: set[str] = set()  # peers whose status says they build segments for others
        self._collectors: set[str] = set()  # ... that collect every checkpoint ([checkpoint] collect)
        self._announced: dict[str, int] = {}  # peer -> the newest checkpoint its status announces
        self._unheard: set[str] = set()  # peers to hear from again after joining a broker without our session
        self._run_without: tuple[Any, frozenset[str]] = (None, frozenset())  # the device's run, the tiers it lost
        self._rejoin_deadline = 0.0

    # ------------------------------------------------------------------ views

    def online(self) -> set[str]:
        with self._lock:
            return set(self._online)

    def builders(self) -> set[str]:
        with self._lock:
            return self._builders & self._online

    def collectors(self) -> set[str]:
        with self._lock:
            return self._collectors & self._online

    def announced(self) -> dict[str, int]:
        with self._lock:
            return {a: it for a, it in self._announced.items() if a in self._online}

    # ------------------------------------------------------------ the broker

    def moved_broker(self) -> None:
        """Connected to another broker: a process seen on the old one does not make one here stale
        (any other is newer)."""
        with self._lock:
            self._sessions = {a: (sess, 0.0) for a, (sess, _) in self._sessions.items()}

    def rejoined(self, grace_s: float) -> None:
        """Joined a broker without our session: every peer online is to be heard from within ``grace_s``."""
        with self._lock:
            self._unheard = set(self._online)
            self._rejoin_deadline = time.monotonic() + grace_s

    def not_back(self, now: float) -> list[str]:
        """The peers not heard from once the grace period is over (now offline here)."""
        with self._lock:
            silent = sorted(self._unheard) if self._unheard and now > self._rejoin_deadline else []
            if silent:
                self._unheard = set()
            self._online -= set(silent)
        return silent

    def run_without(self, run: Optional[str], peer: str) -> bool:
        """Whether the device started ``run`` without ``peer`` (its status says so: the peer was not
        online when the run began), a run that never waits for it."""
        with self._lock:
            return run is not None and self._run_without[0] == run and peer in self._run_without[1]

    def forget_unheard(self) -> None:
        with self._lock:
            self._unheard.clear()

    # --------------------------------------------------------------- statuses

    def status_of(self, account: str, status: dict[str, Any], retained: bool) -> Optional[str]:
        """Learn from a peer's status who is lost, back, or a new process; return why it is refused
        if it comes from an earlier process than one already seen."""
        session, started = status.get("session"), status.get("started")
        if not (isinstance(session, str) and isinstance(started, (int, float))):
            session, started = "", 0.0  # a status from before sessions were named: taken as it is
        nonce = session.split(":")[0]
        seen_session, seen_started = self._sessions.get(account, ("", 0.0))
        other = bool(seen_session and nonce and nonce != seen_session.split(":")[0])  # not the process seen
        earlier = other and started < seen_started
        if account == self.account:
            if earlier and not retained:  # the Last Will of an earlier process of ours replaced our status
                self._on_own_replaced()
            return None
        if earlier:
            return f"stale status: from a process of {account!r} older than the one seen"
        state = status.get("state")
        if state == "failed" and isinstance(status.get("error"), str):
            self.errors[account] = status["error"][:500]  # why it failed, in its own words (for logs)
        with self._lock:
            if not retained or session != seen_session:  # published on this broker (not kept from before)
                self._unheard.discard(account)
            (self._online.add if state == "online" else self._online.discard)(account)
            for flag, peers in (("builder", self._builders), ("collector", self._collectors)):
                (peers.add if state == "online" and status.get(flag) is True else peers.discard)(account)
            if account == "device" and isinstance(status.get("run_without"), list):
                self._run_without = (status.get("run"), frozenset(t for t in status["run_without"] if isinstance(t, str)))
            it = status.get("checkpoint_iteration")
            if type(it) is int and it >= 0:
                self._announced[account] = it
            else:
                self._announced.pop(account, None)
        mailbox = self._mailbox()
        if account == "device" and mailbox.run is not None and status.get("abandoned") == mailbox.run:
            mailbox.lose("device", NEW_RUN)  # the device gave up the run we follow: so do we
        if state == "online":
            self._sessions[account] = (session, started)
            if other:  # a newer process (an earlier one was refused above), and no Last Will said the old
                # one went (it went down with the broker, or came back before its keepalive ran out):
                # whatever the old one held is gone
                log.warning("%s: the %s is back as a new process", self.account, account)
                mailbox.lose(account, RESTARTED)
            else:
                mailbox.found(account)
                if not retained and _reconnected(seen_session, session):  # to a broker that may have lost
                    self._on_reconnected(account)  # what we sent it (not a new process: it starts afresh)
        elif state in ("offline", "failed") and not retained:  # lost now, not before we came
            mailbox.lose(account, state)
        return None


def _reconnected(seen: Any, session: Any) -> bool:
    """Whether status ``session`` ("nonce:connects") is the same process as ``seen``, connected anew."""
    if not (isinstance(seen, str) and isinstance(session, str)):
        return False
    return seen != session and seen.split(":")[0] == session.split(":")[0]
