"""The embedded fallback broker: amqtt with the broker directory's accounts and ACL.

For laptops and demos where Mosquitto is not installed. It enforces the same rules as the
Mosquitto configuration (no anonymous clients, the password file's accounts, each account
publishing only its own topics and only the planner the schedule). Mosquitto remains the broker
for deployments and for every multi-process test.

Run as ``python -m broker.embedded --dir D [--port P]``; it prints a line containing
:data:`READY` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import dataclass
from typing import Any, Optional

from hiertrain.broker.layout import BrokerDir, password_matches, read_password_file
from hiertrain.net import topics
from hiertrain.errors import BrokerError

READY = "hiertrain embedded broker running"
log = logging.getLogger("hiertrain.broker")


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest)."""
    f, t = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(f) == len(t)


try:
    from amqtt.contexts import Action
    from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
except ImportError:  # the fallback is optional: pip install 'hiertrain[broker]'
    BaseAuthPlugin = BaseTopicPlugin = object  # type: ignore[misc,assignment]
    Action = None  # type: ignore[assignment]


class AccountAuthPlugin(BaseAuthPlugin):  # type: ignore[misc,valid-type]
    """Accepts exactly the accounts of the password file, with their passwords."""

    @dataclass
    class Config:
        passwd_file: str = ""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._hashes = read_password_file(self.config.passwd_file)

    async def authenticate(self, *, session: Any) -> bool:
        hashed = self._hashes.get(session.username or "")
        ok = hashed is not None and password_matches(session.password or "", hashed)
        if not ok:
            log.warning("refused client %r (user %r): not authorized", session.client_id, session.username)
        return ok


class AccountAclPlugin(BaseTopicPlugin):  # type: ignore[misc,valid-type]
    """Each account reads the hiertrain tree and writes only what ``topics.writable_by`` allows."""

    @dataclass
    class Config:
        pass

    async def topic_filtering(self, *, session: Any = None, topic: Optional[str] = None,
                              action: Any = None) -> bool:
        user = getattr(session, "username", None)
        if user is None or topic is None:
            return False
        if action == Action.PUBLISH:
            allowed = any(topic_matches(f, topic) for f in _writable(user))
            if not allowed:
                log.warning("refused publish by %r on %r", user, topic)
            return allowed
        return topic.startswith(topics.ROOT + "/")


def _writable(user: str) -> list[str]:
    try:
        return topics.writable_by(user)
    except topics.TopicError:
        return []


def config(bdir: BrokerDir, port: int) -> dict[str, Any]:
    settings = bdir.settings()
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{settings.bind}:{port}", "max_connections": 64}},
        "plugins": {
            "hiertrain.broker.embedded.AccountAuthPlugin": {"passwd_file": str(bdir.passwd)},
            "hiertrain.broker.embedded.AccountAclPlugin": {},
        },
    }


async def serve(bdir: BrokerDir, port: int) -> None:
    try:
        from amqtt.broker import Broker
    except ImportError:
        raise BrokerError("the embedded broker needs amqtt: pip install 'hiertrain[broker]'") from None
    broker = Broker(config(bdir, port))
    await broker.start()
    print(f"{READY} on port {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


def command(bdir: BrokerDir, port: Optional[int] = None) -> list[str]:
    """The command line that runs the embedded broker for ``bdir`` as a child process."""
    settings = bdir.with_port(port)
    if settings.bridge:
        raise BrokerError(f"{bdir.root} bridges its site to the cloud's broker: that takes Mosquitto (apt-get install "
                          f"-y mosquitto); the embedded broker has no bridge")
    return [sys.executable, "-m", "hiertrain.broker.embedded", "--dir", str(bdir.root), "--port", str(settings.port)]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker.embedded")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--port", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    bdir = BrokerDir(args.dir)
    port = bdir.with_port(args.port).port
    asyncio.run(serve(bdir, port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
