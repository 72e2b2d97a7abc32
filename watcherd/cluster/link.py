"""The dispatcher's connections to the broker: submissions out, replies and dead letters in.

What arrives is handed to the loop as it came (`incoming`); the loop reads it with `wire`, so a
message this code cannot read is refused there, once, whatever its shape.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

from watcherd.cluster import app as app_mod
from watcherd.core.backoff import backoff_s
from watcherd.core.records import inbox_id
from watcherd.core.settings import Settings, redact_url

log = logging.getLogger("watcherd")

RECONNECT_MAX_S = 10.0
IDLE_WAIT_S = 1.0  # each link thread looks at its heartbeats this often when nothing happens


class Link:
    """The dispatcher's connections to RabbitMQ, each on its own thread (kombu connections are
    not thread-safe): one consumes replies (it sleeps in the socket until a message comes), one
    publishes submissions (it sleeps on a condition until the loop hands it one). Neither polls,
    so a submission leaves at once and an idle dispatcher costs nothing."""

    def __init__(self, settings: Settings, *, wake: Callable[[], None]):
        assert settings.paths.inbox is not None
        self.cluster = settings.cluster
        self.app = app_mod.make_app(settings.cluster)
        self.queue = app_mod.task_queue(settings.cluster)
        self.replies = app_mod.reply_queue(settings.cluster, inbox_id(settings.paths.inbox))
        self.dead = app_mod.dead_queue(settings.cluster)
        self.wake = wake
        self.outgoing: collections.deque[dict[str, Any]] = collections.deque()
        self.incoming: collections.deque[tuple[str, Any]] = (
            collections.deque()
        )  # ("reply" | "dead" | "undecodable", body)
        self._up = {"consume": False, "publish": False}
        self.ever_connected = False
        self._stop = threading.Event()
        self._submitted = threading.Condition()
        self._threads: list[threading.Thread] = []

    @property
    def connected(self) -> bool:
        return all(self._up.values())

    def start(self) -> None:
        if not self._threads:
            for role, session in (("consume", self._consuming), ("publish", self._publishing)):
                thread = threading.Thread(target=self._run, args=(role, session), name=f"broker-{role}", daemon=True)
                self._threads.append(thread)
                thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._submitted:
            self._submitted.notify_all()
        for thread in self._threads:
            thread.join(timeout=5.0)

    def submit(self, task: dict[str, Any]) -> None:
        with self._submitted:
            self.outgoing.append(task)
            self._submitted.notify()

    def _run(self, role: str, session: Callable[[Any], None]) -> None:
        where = redact_url(self.cluster.broker_url or "")
        failures = 0
        while not self._stop.is_set():
            try:
                with self.app.connection_for_write() as conn:
                    conn.ensure_connection(max_retries=1)
                    session(conn)
                failures = 0
            except Exception as exc:  # any broker or socket failure: reconnect (kombu raises many kinds)
                failures += 1
                if self._up[role] or failures == 1:
                    log.warning("Broker %s unreachable (%s: %s); retrying", where, role, exc)
                self._up[role] = False
                self._stop.wait(backoff_s(failures, first_s=0.5, most_s=RECONNECT_MAX_S))

    def _connected(self, role: str) -> None:
        self._up[role] = True
        if self.connected:
            self.ever_connected = True
            log.info(
                "Connected to the broker %s (queue %s)", redact_url(self.cluster.broker_url or ""), self.queue.name
            )
            self.wake()

    def _consuming(self, conn: Any) -> None:
        channel = conn.default_channel
        for queue in (self.queue, self.replies, self.dead):
            queue(channel).declare()
        with conn.Consumer(
            [self.replies, self.dead],
            callbacks=[self._on_message],
            on_decode_error=self._on_decode_error,
            accept=["json"],
            channel=channel,
        ):
            self._connected("consume")
            while not self._stop.is_set():
                try:
                    conn.drain_events(timeout=IDLE_WAIT_S)
                except TimeoutError:
                    conn.heartbeat_check()

    def _publishing(self, conn: Any) -> None:
        producer = conn.Producer(conn.default_channel)
        self._connected("publish")
        while not self._stop.is_set():
            with self._submitted:
                if not self.outgoing:
                    self._submitted.wait(IDLE_WAIT_S)
            while self.outgoing:
                task = self.outgoing[0]
                self.app.send_task(app_mod.TASK_NAME, kwargs=task, queue=self.queue, producer=producer, retry=False)
                self.outgoing.popleft()  # only once the broker confirmed it
            try:
                conn.drain_events(timeout=0.001)  # the broker's heartbeats (nothing else comes here)
            except TimeoutError:
                pass
            conn.heartbeat_check()

    def _on_message(self, body: Any, message: Any) -> None:
        queue = (message.delivery_info or {}).get("routing_key")
        if queue == self.dead.name or "x-death" in (message.headers or {}):
            kwargs = body[1] if isinstance(body, list) and len(body) > 1 and isinstance(body[1], dict) else {}
            self.incoming.append(("dead", kwargs))
        else:
            self.incoming.append(("reply", body))  # read (or refused) by the loop: wire.decode_reply
        message.ack()
        self.wake()

    def _on_decode_error(self, message: Any, exc: Exception) -> None:
        """A message that is not JSON (another content type, bytes that do not parse). Left
        unacknowledged it would come back first after every reconnect, for ever: acknowledged,
        counted and said by the loop, which refuses it."""
        message.ack()
        self.incoming.append(("undecodable", f"{type(exc).__name__}: {str(exc)[:200]}"))
        self.wake()
