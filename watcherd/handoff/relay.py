"""Hand-off of finished files: the durable queues that feed hooks (`hooks.py`) and the webhook
(`webhook.py`), and the sink the spool calls at the end of every publication.

`Handoff.published` is called by `Publication._publish` after every output of a file is durable and
before its publication record is removed. It writes one entry per configured consumer (a hook
job, a webhook delivery), durably, under a name derived from the record's name, the status and
`finished_at`, so a crash followed by a re-run of the publication finds the entry already there
and does not add a second one. Nothing is lost between publication and enqueue, and a consumer's
work is at-least-once across crashes (the entry is removed only once the work is done).

Where the queues live, and why not in the work area: the default work area is inside the inbox,
which share users can rename or plant into (design §9). A queue entry there could make the daemon
POST or execute something. The queues live in the state folder (never in the inbox), owner-only:
  <state>/<inbox id>.handoff/hooks/<key>.json      a hook still to run (or running)
  <state>/<inbox id>.handoff/webhook/<key>.json    a delivery still to make
  <state>/<inbox id>.handoff/aside/                anything found there that we did not write
and every entry carries an HMAC (key `handoff.key`, created once in the state folder), so even an
entry planted there is set aside with one log line, never run or posted. Entries hold values
(paths, status, the document), never a program or a URL: those always come from the config.
"""

from __future__ import annotations

import collections
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watcherd.core import safefs
from watcherd.core.records import inbox_id
from watcherd.core.settings import ConfigError, Settings
from watcherd.handoff.mailbox import Mailbox, entry_key

if TYPE_CHECKING:
    from watcherd.handoff.hooks import HookRunner
    from watcherd.handoff.webhook import Webhook

log = logging.getLogger("watcherd")


class Handoff:
    """The spool's after-publication sink, and the owner of the hook runner and the webhook."""

    def __init__(self, settings: Settings, *, wake: Callable[[], None], clock: Callable[[], float] = time.monotonic):
        assert settings.paths.inbox is not None
        self.settings = settings
        self.wake = wake
        self.clock = clock  # the hook runner's, whose deadlines the loop sleeps until
        self.root = settings.state_dir / f"{inbox_id(settings.paths.inbox)}.handoff"
        self.hooks: HookRunner | None = None
        self.webhook: Webhook | None = None
        self._arrived: collections.deque[tuple[str, str]] = collections.deque()  # (consumer, entry name)
        self._lock = threading.Lock()

    def open(self) -> None:
        """Create the queue folders, load what a previous run left, start the webhook's thread.
        Each consumer's folder exists only while it is configured; entries left there by an earlier
        configuration wait (and are logged) until it is configured again."""
        from watcherd.handoff.hooks import HookRunner  # they import this module's Mailbox
        from watcherd.handoff.webhook import Webhook

        s = self.settings
        hooks_on = s.hooks.on_success is not None or s.hooks.on_failure is not None
        if not hooks_on and s.webhook.url is None:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            with safefs.folder(s.state_dir, []) as fd:
                key = safefs.key_file(fd, "handoff.key")
                with safefs.folder(fd, [self.root.name]) as root:  # never a link planted in its place
                    if stat.S_IMODE(os.fstat(root).st_mode) & 0o077:
                        os.fchmod(root, 0o700)
        except OSError as exc:
            raise ConfigError(
                f"cannot use the state folder {s.state_dir} for hooks/webhook: {exc.strerror or exc}",
                key="paths.state",
                source=s.source,
            ) from None
        if hooks_on:
            self.hooks = HookRunner(
                s.hooks, Mailbox(self.root / "hooks", "hook", key), wake=self.wake, clock=self.clock
            )
            self.hooks.open()
        if s.webhook.url is not None:
            self.webhook = Webhook(
                s.webhook, Mailbox(self.root / "webhook", "webhook", key), source=s.source, wake=self.wake
            )
            self.webhook.open()

    def published(self, record_name: str, document: dict[str, Any], json_path: Path) -> None:
        """The spool's sink (may run on the publisher's thread): enqueue durably, idempotently.
        Consumers hear of the entries only once all are written: if one cannot be (state folder
        full), the publication is held and re-run, and nothing has started on a half-done one."""
        name = f"{entry_key(record_name, document)}.json"
        ok = document.get("status") != "failed"
        hook = self.hooks is not None and self.hooks.configured(ok=ok)
        if hook:
            assert self.hooks is not None
            self.hooks.mailbox.put(name, {"values": hook_values(document, json_path)})
        if self.webhook is not None:
            from watcherd.core.naming import dumps

            payload = {
                "event": "done" if ok else "failed",
                "source": str(document.get("source") or ""),
                "created": time.time(),
                "body": dumps(document).decode("utf-8"),  # the published JSON, as written
            }
            self.webhook.mailbox.put(name, payload)
        if hook:
            self._arrive("hook", name)
        if self.webhook is not None:
            self.webhook.add(name)  # both add() ignore a name they already hold

    def _arrive(self, consumer: str, name: str) -> None:
        with self._lock:
            self._arrived.append((consumer, name))
        self.wake()

    def tick(self) -> None:
        """From the main loop: start, reap and time out hooks (never waits)."""
        with self._lock:
            arrived, self._arrived = self._arrived, collections.deque()
        if self.hooks is not None:
            for _, name in arrived:
                self.hooks.add(name)
            self.hooks.tick()

    def next_wakeup(self) -> float | None:
        return self.hooks.next_wakeup() if self.hooks is not None else None

    def stop(self) -> None:
        if self.hooks is not None:
            self.hooks.stop()
        if self.webhook is not None:
            self.webhook.stop()

    def status(self) -> dict[str, Any]:
        """For the status file (and the metrics): backlog and outcomes, no secret, no URL."""
        out: dict[str, Any] = {}
        if self.hooks is not None:
            out["hooks"] = {"queued": self.hooks.backlog(), "running": len(self.hooks.running), **self.hooks.counts}
        if self.webhook is not None:
            out["webhook"] = {"backlog": self.webhook.backlog(), **self.webhook.counts}
        return out


def hook_values(document: dict[str, Any], json_path: Path) -> dict[str, str]:
    """The placeholders' values (docs/handoff.md); empty strings for what was not written."""
    return {
        "json": str(json_path),
        "source": str(document.get("source") or ""),
        "original": str(document.get("image_path") or ""),
        "text": str(document.get("text_path") or ""),
        "pdf": str(document.get("pdf_path") or ""),
        "status": str(document.get("status") or ""),
        "error_code": str(document.get("error_code") or ""),
        "sha256": str(document.get("sha256") or ""),
    }
