"""Does a slow hook or a webhook slow the daemon down? Files/s published, and hand-offs/s finished.

    .venv/bin/python benchmarks/hooks.py [--files 40]

Echo engine (instant), `--files` files dropped at once, one run per row, one after the other:
- no hook: the baseline;
- a hook that takes 1 s (`sh -c 'sleep 1; touch ...'`) with `hooks.max_parallel: 4`: publication
  should keep the baseline's pace (hooks run beside the loop), hooks finish at ≤ 4 files/s;
- a webhook to a receiver on loopback that answers 200 at once.
Published files/s: files ÷ (last finished_at − first received_at); hand-offs/s: files ÷ (last hook
marker written, or last delivery received, − first received_at). Then what one durable enqueue
costs (`Mailbox.put`: a small file and its folder fsync'ed), in a temp folder like the daemons'.
"""

from __future__ import annotations

import argparse
import http.server
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from harness import BenchDaemon, iso, machine, table, wait_for
from PIL import Image


def drop(daemon: BenchDaemon, n: int) -> None:
    source = daemon.inbox.parent / "page.png"
    Image.new("RGB", (20, 10), "white").save(source)
    data = source.read_bytes()
    for i in range(n):
        tmp = daemon.inbox / f".f{i:05}.tmp"
        tmp.write_bytes(data)
        tmp.rename(daemon.inbox / f"f{i:05}.png")


class Receiver:
    def __init__(self) -> None:
        self.times: list[float] = []
        times = self.times

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                times.append(time.time())
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def run(n: int, **sections: Any) -> tuple[float, float | None]:
    daemon = BenchDaemon(ocr={"engine": "tests.engines:Echo"}, **sections)
    marks = Path(daemon.tmp.name) / "marks"
    marks.mkdir()
    receiver = None
    if sections.get("hooks"):
        daemon.config.write_text(daemon.config.read_text().replace("MARKS", str(marks)))
    if sections.get("webhook"):
        receiver = Receiver()
        daemon.config.write_text(daemon.config.read_text().replace("RECEIVER", receiver.url))
    daemon.start()
    try:
        drop(daemon, n)
        wait_for(lambda: len(daemon.results()) == n, 600, f"{n} results")
        docs = daemon.documents()
        ended: float | None = None
        if sections.get("hooks"):
            wait_for(lambda: len(list(marks.iterdir())) == n, 600, f"{n} hooks")
            ended = max(p.stat().st_mtime for p in marks.iterdir())
        if receiver is not None:
            wait_for(lambda: len(receiver.times) == n, 600, f"{n} deliveries")
            ended = max(receiver.times)
    finally:
        daemon.stop()
        if receiver is not None:
            receiver.server.shutdown()
    start = min(iso(d["received_at"]) for d in docs)
    published = n / (max(iso(d["finished_at"]) for d in docs) - start)
    return published, None if ended is None else n / (ended - start)


def enqueue_ms(n: int = 200) -> float:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from watcherd.handoff.mailbox import Mailbox

    with tempfile.TemporaryDirectory(prefix="watcherd-bench-") as tmp:
        mailbox = Mailbox(Path(tmp) / "q", "hook", b"k" * 32)
        mailbox.open()
        started = time.perf_counter()
        for i in range(n):
            mailbox.put(f"{i:040x}.json", {"values": {"json": "/srv/ocr/outbox/" + "x" * 60}})
        elapsed = time.perf_counter() - started
        mailbox.close()
    return elapsed / n * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=40)
    args = parser.parse_args()
    n = args.files
    hook = ["/bin/sh", "-c", 'sleep 1; touch "$1"', "hook", "MARKS/{source}"]
    rows = []
    for label, sections in (
        ("no hook, no webhook", {}),
        ("hook of 1 s, max_parallel 4", {"hooks": {"on_success": hook, "max_parallel": 4}}),
        ("webhook, loopback receiver (200)", {"webhook": {"url": "RECEIVER", "secret": "x"}}),
    ):
        published, handed = run(n, **sections)
        rows.append([label, n, f"{published:.1f}", "" if handed is None else f"{handed:.2f}"])
    print(
        table(
            f"Hooks and webhook vs. none ({machine()}, Echo engine)",
            ["configuration", "files", "published files/s", "hooks run / deliveries made per s"],
            rows,
        )
    )
    print(f"\none durable enqueue (Mailbox.put, fsync'ed): {enqueue_ms():.1f} ms")


if __name__ == "__main__":
    main()
