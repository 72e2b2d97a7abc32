"""Hooks and the webhook (docs/handoff.md), with real daemons, real hook processes
and a real HTTP receiver on loopback."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import Daemon, assert_config_error, make_image, run_watcherd, wait_until
from watcherd.core import config_file
from watcherd.core.records import inbox_id

SECRET = "s3cret-do-not-log-4f1c"


class Receiver:
    """A webhook receiver on 127.0.0.1: answers 503 to the first `fail_first` posts, hangs on one
    post (`hang_s`, longer than the daemon's timeout) when `hang_once`, redirects posts for the
    sources in `redirect` to /elsewhere (which must never be called), and 503 to everything while
    `down`. Each post is recorded with the answer given and whether its HMAC matched."""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        self.posts: list[dict[str, Any]] = []
        self.answers: dict[str, list[int]] = {}  # source → codes to answer, in turn (then 200)
        self.elsewhere: list[str] = []
        self.fail_first = 0
        self.hang_once = False
        self.hang_s = 3.0
        self.redirect: set[str] = set()
        self.down = False
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path != "/hook":
                    receiver.elsewhere.append(self.path)
                    self._answer(200)
                    return
                code = receiver.decide(body)
                if code == 0:
                    time.sleep(receiver.hang_s)  # the daemon gave up on us meanwhile
                    code = 503
                with receiver.lock:
                    receiver.posts.append(
                        {
                            "key": self.headers.get("Idempotency-Key"),
                            "event": self.headers.get("X-Watcherd-Event"),
                            "type": self.headers.get("Content-Type"),
                            "signed": hmac.compare_digest(
                                self.headers.get("X-Watcherd-Signature", ""),
                                "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest(),
                            ),
                            "body": body,
                            "code": code,
                        }
                    )
                self._answer(code)

            def _answer(self, code: int) -> None:
                self.send_response(code)
                if code == 302:
                    self.send_header("Location", "/elsewhere")
                if code == 429:
                    self.send_header("Retry-After", "1")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def decide(self, body: bytes) -> int:
        """The answer for this post: a code, or 0 to hang."""
        with self.lock:
            if self.down:
                return 503
            if self.fail_first > 0:
                self.fail_first -= 1
                return 503
            if self.hang_once:
                self.hang_once = False
                return 0
        source = json.loads(body).get("source")
        if source in self.redirect:
            return 302
        with self.lock:
            answers = self.answers.get(source)
            if answers:
                return answers.pop(0) if len(answers) > 1 else answers[0]  # the last one for good
        return 200

    def delivered(self) -> dict[str, list[dict[str, Any]]]:
        """Posts answered 200, by idempotency key."""
        out: dict[str, list[dict[str, Any]]] = {}
        with self.lock:
            for post in self.posts:
                if post["code"] == 200:
                    out.setdefault(post["key"], []).append(post)
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def drop(d: Daemon, name: str, good: bool = True) -> None:
    """A scan (good) or a file that fails as unreadable, written whole then renamed in."""
    tmp = d.inbox / f".{name}.tmp"
    if good:
        make_image(tmp, fmt="PNG")
    else:
        tmp.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    tmp.rename(d.inbox / name)


def published(d: Daemon) -> dict[str, bytes]:
    """source → the bytes of its result or error JSON."""
    out = {}
    for path in d.results(d.outbox) + d.results(d.failed):
        data = path.read_bytes()
        out[json.loads(data)["source"]] = data
    return out


def handoff_dir(d: Daemon) -> Path:
    return d.state / f"{inbox_id(d.inbox)}.handoff"


def check_deliveries(receiver: Receiver, files: dict[str, bytes]) -> None:
    """Every file delivered exactly once (answered 200 once per key), the body exactly the
    published JSON, signed; repeats only ever under the same key."""
    delivered = receiver.delivered()
    assert all(len(posts) == 1 for posts in delivered.values()), {k: len(v) for k, v in delivered.items()}
    by_source = {json.loads(p[0]["body"])["source"]: p[0] for p in delivered.values()}
    assert set(by_source) == set(files)
    for source, post in by_source.items():
        assert post["body"] == files[source]
        assert post["signed"] and post["type"] == "application/json"
        assert post["event"] == ("done" if json.loads(files[source])["status"] == "ok" else "failed")
    keys: dict[str, set[str]] = {}
    for post in receiver.posts:
        keys.setdefault(json.loads(post["body"])["source"], set()).add(post["key"])
    assert all(len(k) == 1 for k in keys.values()), keys


def test_webhook_delivers_each_file_once_through_503s_a_hang_and_a_redirect(
    daemon_factory: Any, receiver: Receiver
) -> None:
    receiver.fail_first = 2
    receiver.hang_once = True
    receiver.redirect = {"moved.png"}
    d = daemon_factory(webhook={"url": receiver.url, "secret": SECRET, "timeout_s": 1})
    d.start()
    names = ["a.png", "b.png", "c.png", "moved.png"]
    for name in names:
        drop(d, name)
    drop(d, "bad.png", good=False)
    for name in [*names, "bad.png"]:
        d.wait_json(name)
    files = published(d)
    assert json.loads(files["bad.png"])["status"] == "failed"
    wait_until(lambda: len(receiver.delivered()) == 4, 60, f"4 deliveries ({d.log()[-3000:]})")
    wait_until(lambda: "redirect, not followed" in d.log(), 30, "the redirect to be logged")
    del files["moved.png"]
    check_deliveries(receiver, files)
    assert any(p["code"] == 302 for p in receiver.posts)
    assert receiver.elsewhere == []  # the redirect was not followed
    assert "HTTP 503" in d.log()  # the first refusal of a file is a warning; its retries are quiet

    def webhook() -> tuple[int, int, int]:  # the status file is rewritten once a second: wait for it
        status = json.loads(d.status_path.read_text())["handoff"]["webhook"]
        return status["backlog"], status["delivered"], status["failed"]

    wait_until(lambda: webhook() == (0, 4, 1), 10, "no backlog, 4 delivered, 1 failed")
    # The secret appears nowhere an operator looks.
    check = run_watcherd("check", "--config", str(d.config_path))
    shown = run_watcherd("status", "--config", str(d.config_path))
    assert "webhook: 0 backlog, 4 delivered, 1 failed, 0 gave up" in shown.stdout, shown.stdout
    for text in (d.log(), d.status_path.read_text(), check.stdout + check.stderr, shown.stdout + shown.stderr):
        assert SECRET not in text
    assert d.stop() == 0
    assert not list((handoff_dir(d) / "webhook").glob("*.json"))


def test_webhook_kill_9_between_publication_and_delivery_loses_nothing(daemon_factory: Any, receiver: Receiver) -> None:
    receiver.down = True
    d = daemon_factory(webhook={"url": receiver.url, "secret": SECRET, "timeout_s": 2})
    d.start()
    names = ["k1.png", "k2.png", "k3.png"]
    for name in names:
        drop(d, name)
    for name in names:
        d.wait_json(name)

    def tried_all() -> bool:
        with receiver.lock:
            return {json.loads(p["body"])["source"] for p in receiver.posts} == set(names)

    wait_until(tried_all, 30, "a refused post for every file")
    keys_before = {json.loads(p["body"])["source"]: p["key"] for p in receiver.posts}
    d.stop(signal.SIGKILL)
    assert len(list((handoff_dir(d) / "webhook").glob("*.json"))) == 3
    receiver.down = False
    d.start()
    wait_until(lambda: len(receiver.delivered()) == 3, 30, f"3 deliveries after the restart ({d.log()[-2000:]})")
    check_deliveries(receiver, published(d))
    after = {json.loads(p[0]["body"])["source"]: key for key, p in receiver.delivered().items()}
    assert after == keys_before  # the same Idempotency-Key after the crash
    assert d.stop() == 0


HOOK_SCRIPT = """
import json, os, sys
out, tag = sys.argv[1], sys.argv[2]
record = {"tag": tag, "argv": sys.argv[3:], "cwd": os.getcwd(), "stdin": os.read(0, 10).decode(),
          "env": {k: v for k, v in os.environ.items() if k.startswith("WATCHERD_") or k == "NOTIFY_SOCKET"}}
with open(os.path.join(out, "calls.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\\n")
print("hook says hello for", record["env"].get("WATCHERD_SOURCE"))
"""

PLACEHOLDERS = ["{json}", "{source}", "{original}", "{text}", "{pdf}", "{status}", "{error_code}", "{sha256}"]


def calls(folder: Path) -> list[dict[str, Any]]:
    path = folder / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_hooks_get_placeholders_and_environment_once_per_file(daemon_factory: Any, tmp_path: Path) -> None:
    out = tmp_path / "hookout"
    out.mkdir()
    script = tmp_path / "hook.py"
    script.write_text(HOOK_SCRIPT)
    argv = [sys.executable, str(script), str(out)]
    d = daemon_factory(hooks={"on_success": [*argv, "ok", *PLACEHOLDERS], "on_failure": [*argv, "fail", *PLACEHOLDERS]})
    d.start(env={"NOTIFY_SOCKET": str(tmp_path / "no-such-socket")})
    drop(d, "good.png")
    drop(d, "bad.png", good=False)
    ok, failed = d.wait_json("good.png"), d.wait_json("bad.png")
    wait_until(lambda: len(calls(out)) == 2, 30, f"two hook runs ({d.log()[-2000:]})")
    by_tag = {c["tag"]: c for c in calls(out)}
    for tag, doc, folder in (("ok", ok, d.outbox), ("fail", failed, d.failed)):
        call = by_tag[tag]
        values = [
            str(folder / f"{doc['source']}.json"),
            doc["source"],
            doc["image_path"],
            doc.get("text_path") or "",
            "",
            doc["status"],
            doc.get("error_code") or "",
            doc["sha256"],
        ]
        assert call["argv"] == values
        names = ["JSON", "SOURCE", "ORIGINAL", "TEXT", "PDF", "STATUS", "ERROR_CODE", "SHA256"]
        assert call["env"] == {f"WATCHERD_{n}": v for n, v in zip(names, values, strict=True)}  # no NOTIFY_SOCKET
        assert call["cwd"] == "/" and call["stdin"] == ""
        assert Path(call["argv"][0]).exists()
    assert by_tag["fail"]["argv"][6] == "unreadable" and by_tag["ok"]["argv"][3].endswith(".md")
    wait_until(lambda: d.log().count("hook ended (exit code 0") == 2, 10, "hook_done logged")
    assert "hook says hello for good.png" in d.log()
    assert d.stop() == 0
    assert len(calls(out)) == 2  # never twice for one file
    assert not list((handoff_dir(d) / "hooks").glob("*.json"))


HANG_SCRIPT = """
import os, subprocess, sys, time
if os.path.exists(sys.argv[1]):
    sys.exit(0)  # only the first file's hook hangs
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
with open(sys.argv[1], "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
time.sleep(300)
"""


def test_a_hanging_hook_is_killed_with_its_group_and_others_go_on(daemon_factory: Any, tmp_path: Path) -> None:
    script = tmp_path / "hang.py"
    script.write_text(HANG_SCRIPT)
    pids_file = tmp_path / "pids"
    failing = [sys.executable, "-c", "import sys; print('boom on', sys.argv[1]); sys.exit(3)", "{source}"]
    d = daemon_factory(
        hooks={
            "on_success": [sys.executable, str(script), str(pids_file)],
            "on_failure": failing,
            "timeout_s": 6,
            "max_parallel": 1,
        }
    )
    d.start()
    drop(d, "slow.png")
    d.wait_json("slow.png")
    pids = [int(p) for p in wait_until(lambda: pids_file.exists() and pids_file.read_text().split(), 20, "the hook")]
    # The daemon keeps publishing while the hook hangs (the other hooks wait: max_parallel 1).
    drop(d, "next.png")
    drop(d, "broken.png", good=False)
    d.wait_json("next.png")
    d.wait_json("broken.png")
    assert "ran past" not in d.log() and all(psutil.pid_exists(p) and not _zombie(p) for p in pids)
    wait_until(lambda: "ran past hooks.timeout_s (6 s)" in d.log(), 30, "the timeout to be logged")
    assert "slow.png: hook failed (signal SIGKILL, ran past hooks.timeout_s (6 s)" in d.log()
    wait_until(lambda: all(_zombie(p) for p in pids), 10, "the hook's whole group to be gone")
    wait_until(lambda: "exit code 3" in d.log() and "next.png: hook ended" in d.log(), 30, "the other hooks")
    assert "broken.png: hook failed (exit code 3" in d.log() and "boom on broken.png" in d.log()
    assert d.alive()
    wanted = {
        "counts": {"ok": 2, "failed": 1, "duplicate": 0},
        "hooks": {"queued": 0, "running": 0, "done": 1, "failed": 2},
    }

    def status() -> dict[str, Any]:  # the status file is rewritten once a second: wait for it
        doc = json.loads(d.status_path.read_text())
        return {"counts": doc["counts"], "hooks": doc["handoff"]["hooks"]}

    wait_until(lambda: status() == wanted, 10, "the status file to count files and hooks")
    assert d.stop() == 0


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_missing_hook_program_is_logged_and_nothing_else(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory(hooks={"on_success": [str(tmp_path / "no-such-program"), "{json}"]})
    d.start()
    for name in ("m1.png", "m2.png"):
        drop(d, name)
        d.wait_json(name)
    wait_until(lambda: d.log().count("cannot start") == 2, 10, "two hook_failed lines")
    assert "no-such-program: No such file or directory" in d.log()
    assert d.alive()
    # A reload keeps the running hooks: the queues' consumers change only with a restart.
    d.configure(hooks={"on_success": ["/bin/true"]})
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "hooks.* or webhook.* changed: that takes a restart" in d.log(), 20, "the reload")
    drop(d, "m3.png")
    d.wait_json("m3.png")
    wait_until(lambda: d.log().count("cannot start") == 3, 10, "the old hook, still")
    assert d.stop() == 0


def test_planted_queue_entries_are_set_aside_never_run_or_posted(
    daemon_factory: Any, receiver: Receiver, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    d = daemon_factory(
        hooks={"on_success": ["/usr/bin/touch", str(marker)]},
        webhook={"url": receiver.url},
    )
    hooks, webhook = handoff_dir(d) / "hooks", handoff_dir(d) / "webhook"
    hooks.mkdir(parents=True)
    webhook.mkdir(parents=True)
    forged_body = json.dumps({"v": 1, "kind": "hook", "values": {"json": "/etc/passwd"}})
    (hooks / ("a" * 40 + ".json")).write_text(json.dumps({"body": forged_body, "mac": "0" * 64}))
    (hooks / ("b" * 40 + ".json")).write_bytes(b"\0garbage")
    (hooks / "evil.sh").write_text("#!/bin/sh\ntouch /tmp/pwned\n")
    (webhook / ("c" * 40 + ".json")).symlink_to("/etc/passwd")
    forged = json.dumps({"v": 1, "kind": "webhook", "event": "done", "created": time.time(), "body": "{}"})
    (webhook / ("d" * 40 + ".json")).write_text(json.dumps({"body": forged, "mac": "f" * 64}))
    d.start()
    wait_until(lambda: d.log().count("Set aside") >= 5, 20, f"five entries set aside ({d.log()[-2000:]})")
    assert "forged or altered" in d.log()
    assert len(list((handoff_dir(d) / "aside").iterdir())) == 5
    assert not marker.exists() and receiver.posts == []
    drop(d, "real.png")  # the queues still work
    d.wait_json("real.png")
    wait_until(lambda: marker.exists() and len(receiver.delivered()) == 1, 30, "the real hook and delivery")
    assert d.stop() == 0


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ("hooks: {on_success: '/bin/echo {json}'}", "hooks.on_success", "expected a list"),
        ("hooks: {on_success: []}", "hooks.on_success", "must name a program"),
        ("hooks: {on_failure: [/bin/echo, '{nope}']}", "hooks.on_failure[1]", "unknown placeholder {nope}"),
        ("hooks: {on_failure: [/bin/echo, '{json.__class__}']}", "hooks.on_failure[1]", "unknown placeholder"),
        ("hooks: {on_success: [/bin/echo, 'a{']}", "hooks.on_success[1]", "write {{"),
        ("hooks: {timeout_s: 0}", "hooks.timeout_s", "greater than 0"),
        ("hooks: {max_parallel: 0}", "hooks.max_parallel", "greater than 0"),
        ("hooks: {max_parallel: 1.5}", "hooks.max_parallel", "whole number"),
        ("webhook: {url: 'ftp://example.org/x'}", "webhook.url", "http:// or https://"),
        ("webhook: {url: 'http:///nohost'}", "webhook.url", "with a host"),
        ("webhook: {url: 'https://h/x', secret: a, secret_file: /etc/hostname}", "webhook.secret_file", "not both"),
        ("webhook: {url: 'https://h/x', max_age_s: -1}", "webhook.max_age_s", "greater than 0"),
        ("webhook: {url: 'https://h/x', timeout_s: .nan}", "webhook.timeout_s", "finite"),
        ("webhook: {uri: 'https://h/x'}", "webhook.uri", "unknown key"),
        ("webhook: {url: 'https://h/x', secret: 31415926535}", "webhook.secret", "int (not shown)"),
        ("webhook: {url: 'https://h/x', secret: ''}", "webhook.secret", "non-empty string"),
        ("webhook: {url: 'https://h/x', secret_file: ROOT/missing}", "webhook.secret_file", "cannot read"),
    ],
)
def test_bad_hook_and_webhook_settings_exit_78_naming_the_key(tmp_path: Path, extra: str, key: str, words: str) -> None:
    base = (
        "paths: {inbox: ROOT/inbox, outbox: ROOT/outbox, failed: ROOT/failed, archive: ROOT/archive, "
        "state: ROOT/state}\nocr: {engine: 'tests.engines:Echo'}\n"
    )
    result = assert_config_error(tmp_path, base + extra, key, words)
    assert "31415926535" not in result.stderr


def test_a_secret_in_a_url_or_secret_never_reaches_the_message(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    config = tmp_path / "watcherd.yaml"
    config.write_text(
        f"paths: {{inbox: {tmp_path}/inbox, outbox: {tmp_path}/o, failed: {tmp_path}/f, archive: {tmp_path}/a}}\n"
        f"webhook: {{url: 'gopher://user:{SECRET}@h/x?token={SECRET}', secret: {SECRET}}}\n"
    )
    result = run_watcherd("run", "--config", str(config))
    assert result.returncode == 78 and "webhook.url" in result.stderr
    assert SECRET not in result.stderr + result.stdout


def test_hook_entries_survive_kill_9_and_run_after_restart(daemon_factory: Any, tmp_path: Path) -> None:
    """A hook that had not ended when the daemon was killed runs once more at the next start."""
    out = tmp_path / "hookout"
    out.mkdir()
    script = tmp_path / "hook.py"
    wait = "\nimport time\nwhile not os.path.exists(os.path.join(out, 'go')):\n    time.sleep(0.05)\n"
    script.write_text(HOOK_SCRIPT + wait)
    d = daemon_factory(hooks={"on_success": [sys.executable, str(script), str(out), "ok", "{source}"]})
    d.start()
    drop(d, "crash.png")
    d.wait_json("crash.png")
    wait_until(lambda: len(calls(out)) == 1, 20, "the hook to start")
    d.stop(signal.SIGKILL)
    assert len(list((handoff_dir(d) / "hooks").glob("*.json"))) == 1
    (out / "go").touch()
    d.start()
    wait_until(lambda: "hook ended (exit code 0" in d.log(), 20, f"the hook to run again ({d.log()[-2000:]})")
    assert [c["argv"] for c in calls(out)] == [["crash.png"], ["crash.png"]]  # at-least-once: once more
    assert d.stop() == 0
    assert os.listdir(handoff_dir(d) / "hooks") == []


def test_a_publication_run_again_after_a_crash_enqueues_nothing_twice(tmp_path: Path) -> None:
    """Publication._publish calls the sink again when a crash came before the record was removed:
    the same record, status and finished_at name the same entry, which is written once."""
    from watcherd.handoff.relay import Handoff

    (tmp_path / "inbox").mkdir()
    paths = {k: str(tmp_path / k) for k in ("inbox", "outbox", "failed", "archive", "state")}
    s = config_file.from_dict({"paths": paths, "hooks": {"on_success": ["/bin/true", "{json}"]}})
    handoff = Handoff(s, wake=lambda: None)
    handoff.open()
    doc = {"status": "ok", "source": "a.png", "finished_at": "2026-11-29T10:00:00+00:00", "sha256": "ab"}
    for _ in range(2):
        handoff.published("0" * 40 + ".json", doc, tmp_path / "outbox" / "a.png.json")
    assert len(os.listdir(handoff.root / "hooks")) == 1
    handoff.published("0" * 40 + ".json", {**doc, "finished_at": "2026-11-29T11:00:00+00:00"}, tmp_path / "x.json")
    assert len(os.listdir(handoff.root / "hooks")) == 2  # a later file of the same name: its own hook
    assert stat_mode(handoff.root) == stat_mode(handoff.root / "hooks") == 0o700
    handoff.stop()


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_webhook_refusals_retry_after_and_giving_up(daemon_factory: Any, receiver: Receiver) -> None:
    receiver.answers = {"r400.png": [400], "r429.png": [429, 200], "old.png": [503]}
    d = daemon_factory(webhook={"url": receiver.url, "timeout_s": 2, "max_age_s": 4})
    d.start()
    for name in ("r400.png", "r429.png", "old.png", "fine.png"):
        drop(d, name)
        d.wait_json(name)
    wait_until(lambda: "old.png: webhook to" in d.log() and "undelivered after" in d.log(), 30, "the give-up")
    wait_until(lambda: len(receiver.delivered()) == 2, 30, "two deliveries")
    log = d.log()
    assert "r400.png: webhook to http://127.0.0.1" in log and "HTTP 400, refused by the receiver" in log
    assert log.count("undelivered after") == 1 and log.count("HTTP 400") == 1
    tries = {s: [p["code"] for p in receiver.posts if json.loads(p["body"])["source"] == s] for s in receiver.answers}
    assert tries["r400.png"] == [400] and tries["r429.png"] == [429, 200]
    assert len(tries["old.png"]) >= 2 and set(tries["old.png"]) == {503}
    delivered = {json.loads(p[0]["body"])["source"] for p in receiver.delivered().values()}
    assert delivered == {"r429.png", "fine.png"}
    wait_until(lambda: not list((handoff_dir(d) / "webhook").glob("*.json")), 10, "an empty queue")

    def counts() -> tuple[int, int, int]:  # the status file is rewritten once a second: wait for it
        status = json.loads(d.status_path.read_text())["handoff"]["webhook"]
        return status["delivered"], status["failed"], status["gave_up"]

    wait_until(lambda: counts() == (2, 1, 1), 10, "the status file to count the outcomes")
    assert d.stop() == 0


def test_webhook_tls_is_verified_and_ca_file_trusts_a_private_ca(daemon_factory: Any, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)]
        + ["-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    receiver = Receiver(tls=(cert, key))
    try:
        d = daemon_factory(webhook={"url": receiver.url, "timeout_s": 2})
        d.start()
        drop(d, "tls.png")
        d.wait_json("tls.png")
        wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in d.log(), 30, f"a refused certificate ({d.log()[-2000:]})")
        assert receiver.posts == []
        assert d.stop() == 0  # the delivery stays queued over a normal restart
        d.configure(webhook={"url": receiver.url, "timeout_s": 2, "ca_file": str(cert)})
        d.start()
        wait_until(lambda: len(receiver.delivered()) == 1, 30, f"the delivery over TLS ({d.log()[-2000:]})")
        assert d.stop() == 0
    finally:
        receiver.close()


def test_credentials_in_the_webhook_url_are_never_logged(daemon_factory: Any) -> None:
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://user:{SECRET}@127.0.0.1:{port}/in?token={SECRET}"
    d = daemon_factory(webhook={"url": url, "timeout_s": 1}, logging={"level": "debug"})
    d.start()
    drop(d, "c.png")
    d.wait_json("c.png")
    wait_until(lambda: "c.png: webhook to" in d.log(), 20, "the refused connection")
    assert f"webhook to http://user:***@127.0.0.1:{port}/in?… not delivered (ConnectError" in d.log()
    assert SECRET not in d.log() and SECRET not in d.status_path.read_text()
    assert d.stop() == 0


def test_a_hook_running_at_a_normal_stop_is_killed_and_runs_at_the_next_start(
    daemon_factory: Any, tmp_path: Path
) -> None:
    out = tmp_path / "hookout"
    out.mkdir()
    script = tmp_path / "hook.py"
    wait = "\nimport time\nwhile not os.path.exists(os.path.join(out, 'go')):\n    time.sleep(0.05)\n"
    script.write_text(HOOK_SCRIPT + wait)
    d = daemon_factory(
        hooks={"on_success": [sys.executable, str(script), str(out), "ok", "{source}"], "max_parallel": 1}
    )
    d.start()
    drop(d, "s1.png")
    drop(d, "s2.png")
    d.wait_json("s1.png")
    d.wait_json("s2.png")
    wait_until(lambda: len(calls(out)) == 1, 20, "the first hook to start")
    assert d.stop() == 0
    assert "hook failed (signal SIGKILL, still running at shutdown; it runs again at the next start" in d.log()
    assert len(calls(out)) == 1  # the queued one was not started at the stop
    assert len(list((handoff_dir(d) / "hooks").glob("*.json"))) == 2
    (out / "go").touch()
    d.start()
    wait_until(lambda: d.log().count("hook ended (exit code 0") == 2, 20, f"both hooks ({d.log()[-2000:]})")
    ran = sorted(c["argv"][0] for c in calls(out))
    assert ran in (["s1.png", "s1.png", "s2.png"], ["s1.png", "s2.png", "s2.png"])  # the killed one once more
    assert d.stop() == 0


def test_a_name_that_looks_like_an_option_stays_a_file_name_for_the_hook(daemon_factory: Any, tmp_path: Path) -> None:
    """A share user names a folder like one of tar's options: with `{source}` passed as it was,
    `tar -cf backup.tar "{source}"` ran the command hidden in the name as the daemon's user."""
    import shutil
    import tarfile

    tar = shutil.which("tar")
    assert tar is not None
    home = tmp_path / "home"
    home.mkdir()
    backup = tmp_path / "backup.tar"
    d = daemon_factory(hooks={"on_success": [tar, "-cf", str(backup), "-C", str(tmp_path / "archive"), "{source}"]})
    d.start(env={"HOME": str(home)})
    folder = "--use-compress-program=cd ~ && touch pwned #"
    make_image(d.inbox / folder / "x.png")
    d.wait_json(f"{folder}/x.png")
    wait_until(lambda: "hook ended" in d.log() or "hook failed" in d.log(), 30, "the hook's outcome")
    assert not (home / "pwned").exists(), "the name ran as a command"
    assert "hook ended (exit code 0" in d.log(), d.log()
    with tarfile.open(backup) as archive:
        assert archive.getnames() == [f"./{folder}/x.png"]
