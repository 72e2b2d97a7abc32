"""The webhook: POST every finished file's result or error JSON to `webhook.url`, at least once.

Deliveries come from the durable queue (`handoff.Mailbox`, in the state folder) and are made by
one background thread with its own retry clock, so the main loop never waits on the network, and
this thread never touches the work area. An entry is removed only when its delivery is settled
(delivered, refused for good, or given up), so kill -9 at any moment means one more delivery at
the next start, with the same Idempotency-Key.

What a receiver gets (docs/handoff.md): the published JSON as written (`Content-Type:
application/json`), `Idempotency-Key` (stable per file and outcome), `X-Watcherd-Event: done |
failed`, and with a secret `X-Watcherd-Signature: sha256=<hex HMAC-SHA256 of the body>`.

Retried, with exponential backoff and jitter up to MAX_BACKOFF_S (Retry-After honoured within
it): connection errors, timeouts, 5xx, 408, 429. Failed at once, with one error logged: other
4xx, and 3xx (redirects are never followed: a redirect could send the document, and the
signature, somewhere the operator did not configure). Given up after `webhook.max_age_s`, with one
error logged. TLS is verified (httpx's default, or `webhook.ca_file`).

The secret is read once at start and never logged, put in the status file, or in a message; the
URL is logged with its password as *** and its query as … (`settings.redact_url`).
"""

from __future__ import annotations

import email.utils
import hashlib
import heapq
import hmac
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from watcherd import __version__
from watcherd.core import logs, safefs
from watcherd.core.backoff import backoff_s
from watcherd.core.settings import ConfigError, WebhookSettings, redact_url
from watcherd.handoff.mailbox import BadEntry, Mailbox

log = logging.getLogger("watcherd")
# httpx logs each request with its full URL at INFO: a URL may carry user:password or a token.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 300.0
SECRET_MAX_BYTES = 4096
RETRIED_STATUS = {408, 429}


class Webhook:
    def __init__(
        self,
        settings: WebhookSettings,
        mailbox: Mailbox,
        *,
        source: str | None,
        wake: Callable[[], None] | None = None,
    ):
        assert settings.url is not None
        self.settings = settings
        self.mailbox = mailbox
        self.source = source
        self.wake = wake
        self.url = settings.url
        self.where = redact_url(settings.url)
        self.counts = {"delivered": 0, "failed": 0, "gave_up": 0, "retries": 0}  # since start
        self._secret: bytes | None = None
        self._verify: ssl.SSLContext | bool = True
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, str]] = []  # (due, seq, entry name)
        self._attempts: dict[str, int] = {}  # entries known and not settled
        self._seq = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    def open(self) -> None:
        """Read the secret and CA (ConfigError naming the key), queue what a previous run left,
        start the thread."""
        s = self.settings
        if s.secret is not None:
            self._secret = s.secret.encode()
        elif s.secret_file is not None:
            self._secret = _read_secret(s.secret_file, self.source)
        if s.ca_file is not None:
            try:
                self._verify = ssl.create_default_context(cafile=str(s.ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"cannot load CA certificates from {s.ca_file}: {exc}", key="webhook.ca_file", source=self.source
                ) from None
        self.mailbox.open()
        left = self.mailbox.names()
        if left:
            log.info("%d webhook delivery(ies) left from the previous run are queued", len(left))
        for name in left:
            self.add(name)
        self._thread = threading.Thread(target=self._run, name="watcherd-webhook", daemon=True)
        self._thread.start()

    def add(self, name: str, delay_s: float = 0.0) -> None:
        """Queue a delivery (any thread)."""
        with self._cond:
            if name in self._attempts:
                return
            self._attempts[name] = 0
            self._push(name, time.monotonic() + delay_s)

    def backlog(self) -> int:
        """Deliveries not yet settled (queued, waiting to retry, or in flight)."""
        with self._cond:
            return len(self._attempts)

    def stop(self) -> None:
        """Stop after the delivery in flight (bounded by webhook.timeout_s); what is left stays
        queued for the next start."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.timeout_s + 5)
        self.mailbox.close()

    # -- the delivery thread -----------------------------------------------------------------

    def _push(self, name: str, due: float) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, name))
        self._cond.notify_all()

    def _run(self) -> None:
        with httpx.Client(
            follow_redirects=False,
            timeout=self.settings.timeout_s,
            verify=self._verify,
            headers={"User-Agent": f"watcherd/{__version__}"},
        ) as client:
            while True:
                with self._cond:
                    while not self._stopping and (not self._heap or self._heap[0][0] > time.monotonic()):
                        wait = None if not self._heap else max(0.0, self._heap[0][0] - time.monotonic())
                        self._cond.wait(wait)
                    if self._stopping:
                        return
                    _, _, name = heapq.heappop(self._heap)
                    attempt = self._attempts.get(name, 0)
                try:
                    retry_in = self._deliver(client, name, attempt)
                except Exception:  # a bug must not end deliveries for good
                    log.exception("Webhook delivery of entry %s failed unexpectedly; retrying later", name)
                    retry_in = MAX_BACKOFF_S
                with self._cond:
                    if retry_in is None:
                        self._attempts.pop(name, None)
                    else:
                        self._attempts[name] = attempt + 1
                        self._push(name, time.monotonic() + retry_in)
                if self.wake is not None:
                    self.wake()  # the status file shows the backlog

    def _deliver(self, client: httpx.Client, name: str, attempt: int) -> float | None:
        """One attempt; returns seconds until the next one, or None when settled."""
        try:
            entry = self.mailbox.get(name)
            event, created, body, source = entry["event"], entry["created"], entry["body"], entry.get("source", "?")
            if event not in ("done", "failed") or not isinstance(body, str) or not isinstance(created, (int, float)):
                raise BadEntry("mistyped fields")
        except FileNotFoundError:
            return None
        except (BadEntry, KeyError, OSError, ValueError) as exc:
            self.mailbox.set_aside(name, str(exc) or type(exc).__name__)
            return None
        source = str(source)
        age = time.time() - created
        if age >= self.settings.max_age_s:
            self._settle(name, "gave_up", source, f"undelivered after {age:.0f} s (webhook.max_age_s)")
            return None
        data = body.encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": name.removesuffix(".json"),
            "X-Watcherd-Event": event,
        }
        if self._secret is not None:
            headers["X-Watcherd-Signature"] = "sha256=" + hmac.new(self._secret, data, hashlib.sha256).hexdigest()
        try:
            response = client.post(self.url, content=data, headers=headers)
        except httpx.HTTPError as exc:  # connection refused, DNS, TLS, timeouts: the network may heal
            return self._retry(
                name, attempt, source, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, None, created
            )
        code = response.status_code
        if 200 <= code < 300:
            self._settle(name, "delivered", source, f"HTTP {code}")
            return None
        if code >= 500 or code in RETRIED_STATUS:
            return self._retry(name, attempt, source, f"HTTP {code}", response.headers.get("Retry-After"), created)
        if 300 <= code < 400:
            why = f"HTTP {code} redirect, not followed (set webhook.url to the final address)"
        else:
            why = f"HTTP {code}, refused by the receiver; not retried"
        self._settle(name, "failed", source, why)
        return None

    def _retry(self, name: str, attempt: int, source: str, why: str, retry_after: str | None, created: float) -> float:
        delay = backoff_s(attempt + 1, first_s=FIRST_BACKOFF_S, most_s=MAX_BACKOFF_S) * random.uniform(0.5, 1.0)
        asked = _retry_after_s(retry_after)
        if asked is not None:
            delay = min(MAX_BACKOFF_S, max(delay, asked))
        left = created + self.settings.max_age_s - time.time()
        delay = max(0.0, min(delay, left))
        self.counts["retries"] += 1
        level = logging.WARNING if attempt == 0 else logging.DEBUG  # one warning per delivery, not per try
        log.log(level, "%s: webhook to %s not delivered (%s); retrying in %.1f s", source, self.where, why, delay)
        return delay

    def _settle(self, name: str, outcome: str, source: str, why: str) -> None:
        self.counts[outcome] += 1
        self.mailbox.remove(name)
        if outcome == "delivered":
            logs.event("webhook_done", f"{source}: webhook delivered to {self.where} ({why})", source=source)
        else:
            logs.event(
                "webhook_failed",
                f"{source}: webhook to {self.where} failed: {why}",
                level=logging.ERROR,
                source=source,
            )


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds (a number of seconds or an HTTP date), None if absent or odd."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _read_secret(path: Any, source: str | None) -> bytes:
    """The secret file's first line, read within a bound, never through a link."""
    try:
        with safefs.folder(path.parent, []) as fd:
            data = safefs.read_regular(fd, path.name, SECRET_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(
            f"cannot read {path}: {exc.strerror or exc}", key="webhook.secret_file", source=source
        ) from None
    if data is None:
        raise ConfigError(
            f"cannot read {path}: missing, or not a regular file (links are not followed)",
            key="webhook.secret_file",
            source=source,
        )
    secret = data.strip(b"\r\n")
    if not secret or len(data) > SECRET_MAX_BYTES:
        raise ConfigError(
            f"{path} must hold one non-empty line (at most {SECRET_MAX_BYTES} bytes)",
            key="webhook.secret_file",
            source=source,
        )
    return secret
