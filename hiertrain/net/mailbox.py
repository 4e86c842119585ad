"""Where received messages wait for the worker that expects them.

Messages are filed by (kind, iteration, layer, sender). A key is delivered at most once: a
second message with a key already filed or taken is a duplicate and is refused, so QoS-1
redeliveries are handled once. Iterations before the watermark are stale and refused, and once
the owner has advanced, so are iterations more than ``window`` past it (nothing legitimate runs
that far ahead; a sender that does would only fill memory).

Every message names the device's *run* it belongs to. Once the mailbox follows a run, messages of
any other run are refused; a mailbox made after a failover also refuses the runs it retired
before it learns the new one (frames of the abandoned attempt still in flight). One exception: a
message of a run the device started without this tier noticing (a tier that came back as a new
process may have followed an attempt the others then abandoned) is parked, and the wait in
progress ends with :data:`NEW_RUN`; the failover that follows moves what is parked into its new
mailbox.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Optional

from hiertrain.errors import MissingMessage, TierLost
from hiertrain.net.wire import Message

Key = tuple[str, int, int, str]

RESTARTED = "back as a new process"  # its earlier process is gone, and with it what it held
NEW_RUN = "in a new run"  # the device started a run that this tier's mailbox does not follow
NOT_BACK = "not back after the broker changed"  # silent on a restarted or standby broker
_STICKY = (RESTARTED, NEW_RUN)  # a later "online" status does not undo these
PARKED = 16  # messages of the device's new run kept until the failover takes them


class Mailbox:
    def __init__(self, *, remember: int = 65536, window: int = 8, retired: frozenset[str] = frozenset()) -> None:
        self.window = window
        self.run: Optional[str] = None
        self.retired = retired
        self._advanced = False
        self._lost: dict[str, str] = {}  # tier -> the state its status reported (offline, failed)
        self.parked: dict[Key, Message] = {}  # the device's new run, for the next mailbox
        self._cond = threading.Condition()
        self._waiting: dict[Key, Message] = {}
        self._taken: OrderedDict[Key, None] = OrderedDict()
        self._remember = remember
        self._watermark = 0

    def put(self, msg: Message) -> Optional[str]:
        """File ``msg``; return ``None`` if accepted, else the reason it was refused."""
        key = msg.key
        run = msg.meta.get("run")
        with self._cond:
            if self.run is not None and run != self.run and isinstance(run, str) and run not in self.retired \
                    and msg.sender == "device" and len(self.parked) < PARKED:
                self.parked[key] = msg
                self._lost["device"] = NEW_RUN
                self._cond.notify_all()
                return None
            if msg.iteration < self._watermark:
                return f"stale: iteration {msg.iteration} is before {self._watermark}"
            if self._advanced and msg.iteration > self._watermark + self.window:
                return f"too far ahead: iteration {msg.iteration} is more than {self.window} past {self._watermark}"
            if run in self.retired or self.run is not None and run != self.run:
                return f"another run: {run!r} is not {self.run or 'a retired one'}"
            if key in self._waiting or key in self._taken:
                return "duplicate"
            self._waiting[key] = msg
            self._cond.notify_all()
        return None

    def follow(self, run: str) -> None:
        """From now on accept only messages of ``run`` (and drop what waits of others)."""
        with self._cond:
            self.run = run
            for tier in [t for t, state in self._lost.items() if state == RESTARTED]:
                del self._lost[tier]  # a process that was new before the run began lost nothing of it
            for k in [k for k, m in self._waiting.items() if m.meta.get("run") != run]:
                del self._waiting[k]

    def lose(self, tier: str, state: str) -> None:
        """``tier`` went away: every wait that has not been satisfied fails now, naming it."""
        with self._cond:
            self._lost[tier] = state
            self._cond.notify_all()

    def found(self, tier: str) -> None:
        with self._cond:
            if self._lost.get(tier) not in _STICKY:
                self._lost.pop(tier, None)

    def forget(self, party: str) -> None:
        """Waits no longer fail for ``party``: it was planned out (a fleet device that left)."""
        with self._cond:
            self._lost.pop(party, None)

    def check_lost(self, what: str) -> None:
        if self._lost:
            tier, state = next(iter(self._lost.items()))
            raise TierLost(tier=tier, state=state, waiting_for=what)

    def _wait_for(self, key: Key, timeout: float) -> None:
        """Wait (holding the condition) until ``key`` is filed; MissingMessage names it on timeout,
        TierLost names a tier that went away meanwhile."""
        deadline = time.monotonic() + timeout
        while key not in self._waiting:
            kind, iteration, layer, sender = key
            self.check_lost(f"{kind!r} from {sender!r} for iteration {iteration}")
            left = deadline - time.monotonic()
            if left <= 0:
                kind, iteration, layer, sender = key
                raise MissingMessage(kind=kind, sender=sender, iteration=iteration, layer=layer, timeout=timeout)
            self._cond.wait(left)

    def take(self, kind: str, sender: str, iteration: int, layer: int, timeout: float) -> Message:
        """Remove and return the message for this key; raise :class:`MissingMessage` on timeout."""
        key = (kind, iteration, layer, sender)
        with self._cond:
            self._wait_for(key, timeout)
            msg = self._waiting.pop(key)
            self._taken[key] = None
            if len(self._taken) > self._remember:
                self._taken.popitem(last=False)
            return msg

    def wait_any(self, keys: list[Key], timeout: float) -> Optional[Key]:
        """The first of ``keys`` that is filed (in the order given), waiting up to ``timeout`` for one;
        ``None`` if none came. :class:`TierLost` names a sender that went away meanwhile."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for key in keys:
                    if key in self._waiting:
                        return key
                self.check_lost(f"any of {len(keys)} messages")
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def peek(self, kind: str, sender: str, iteration: int, layer: int, timeout: float) -> Message:
        """Like :meth:`take`, but leave the message for a later take."""
        key = (kind, iteration, layer, sender)
        with self._cond:
            self._wait_for(key, timeout)
            return self._waiting[key]

    def first(self, kind: str, sender: str, timeout: float) -> int:
        """The lowest iteration for which a ``kind`` message from ``sender`` waits (waiting for one)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                its = [k[1] for k in self._waiting if k[0] == kind and k[3] == sender]
                if its:
                    return min(its)
                if sender in self._lost:  # between runs only the sender matters (the next run plans around others)
                    raise TierLost(tier=sender, state=self._lost[sender], waiting_for=f"the first {kind!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MissingMessage(kind=kind, sender=sender, iteration=-1, layer=0, timeout=timeout)
                self._cond.wait(left)

    def advance(self, iteration: int) -> int:
        """Refuse from now on anything before ``iteration``; drop what is waiting there. Returns the count dropped."""
        with self._cond:
            self._advanced = True
            self._watermark = max(self._watermark, iteration)
            old = [k for k in self._waiting if k[1] < self._watermark]
            for k in old:
                del self._waiting[k]
            return len(old)

    def pending(self) -> list[Key]:
        with self._cond:
            return sorted(self._waiting)
