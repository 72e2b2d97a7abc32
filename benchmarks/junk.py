"""Junk benchmark: the real daemon against full-size piles of junk, a table of numbers.

    .venv/bin/python benchmarks/junk.py                       # 300,000 folders, 200,000 files
    .venv/bin/python benchmarks/junk.py --folders 30000 --files 20000 --idle-s 10

For each mode (events, polling) the daemon (`tests.engines:Echo`) runs with a real notify socket
and WATCHDOG_USEC=2 s, so it pings WATCHDOG=1 every second from its main loop; the longest gap
between two pings is the main loop's worst stall plus one second. Each pile is built outside the
inbox and moved in with one rename, as a share user's `mv` does; then one real scan is dropped
into the inbox. "served" is pile moved in → the real scan's JSON; "digested" is pile moved in →
the daemon under 25 % of a core over a second. Piles: empty folders in one folder; files the
filter skips (`.txt`, `~$*.jpg`, `*.jpg.part`) in one folder; a tree 1,100 folders deep.

Then, with the folder pile still in the inbox, a fresh daemon is started on it: "start → ready"
(READY=1), "start → digested" (the startup scan done), and its idle CPU and RSS over `--idle-s`.

Not a test: timings depend on the machine. Prints markdown tables and the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import Daemon, make_image, wait_until  # noqa: E402
from tests.test_junk import DEPTH, Idle, WatchdogPings, cpu_seconds, deep_tree  # noqa: E402

WATCHDOG_USEC = 2_000_000


def empty_folders(top: Path, count: int) -> Path:
    top.mkdir(parents=True)
    for i in range(count):
        os.mkdir(top / f"f{i:06d}")
    return top


def skipped_files(top: Path, count: int) -> Path:
    top.mkdir(parents=True)
    for i in range(count):
        (top / (f"doc{i}.txt", f"~$scan{i}.jpg", f"scan{i}.jpg.part")[i % 3]).write_bytes(b"")
    return top


def remove(path: Path) -> None:
    os.system(f"rm -rf --one-file-system '{path}'")  # shutil.rmtree recurses per level (deep trees)


def drop_pile(daemon: Daemon, pings: WatchdogPings, pile: Path, tag: str, staging: Path) -> dict[str, str]:
    since = time.monotonic()
    os.rename(pile, daemon.inbox / pile.name)
    name = f"real-{tag}.png"
    tmp = make_image(staging / name, 40, 10)
    os.rename(tmp, daemon.inbox / name)
    daemon.wait_json(name, timeout=600)
    served = time.monotonic() - since
    wait_until(Idle(daemon.proc.pid), 1200, "the daemon to digest the pile")
    digested = time.monotonic() - since
    wait_until(lambda: len([t for t in pings.times if t >= since]) >= 3, 10, "pings")
    return {"served": f"{served:.1f} s", "digested": f"{digested:.1f} s", "gap": f"{pings.max_gap(since):.2f} s"}


def at_rest(root: Path, mode: str, idle_s: float, tmp: Path) -> dict[str, str]:
    tmp.mkdir(parents=True, exist_ok=True)
    pings = WatchdogPings(tmp)
    daemon = Daemon(root, watch={"mode": mode, "settle_s": 1, "poll_interval_s": 2}, logging={"level": "info"})
    started = time.monotonic()
    daemon.start(env=pings.receiver.env(WATCHDOG_USEC=str(WATCHDOG_USEC)))
    ready = time.monotonic() - started
    try:
        wait_until(Idle(daemon.proc.pid), 1200, "the startup scan")
        digested = time.monotonic() - started
        proc = psutil.Process(daemon.proc.pid)
        before, t0 = cpu_seconds(daemon.proc.pid), time.monotonic()
        time.sleep(idle_s)  # the measuring window
        cpu = 100 * (cpu_seconds(daemon.proc.pid) - before) / (time.monotonic() - t0)
        rss = proc.memory_info().rss / 2**20
        gap = pings.max_gap(started + ready)
        mode_now = "polling" if "polling instead" in daemon.log() else mode
    finally:
        daemon.stop()
        pings.close()
    return {
        "mode": mode if mode_now == mode else f"{mode} → {mode_now}",
        "start → ready": f"{ready:.1f} s",
        "start → digested": f"{digested:.1f} s",
        "idle CPU": f"{cpu:.1f} %",
        "RSS": f"{rss:.0f} MB",
        "longest ping gap": f"{gap:.2f} s",
    }


def table(rows: list[dict[str, str]]) -> None:
    headers = list(rows[0])
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(row[h] for h in headers) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folders", type=int, default=300_000)
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--modes", default="events,polling")
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--dir", default=None, help="where to build the piles (default: a temp folder)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="watcherd-junk-", dir=args.dir))
    drops, rests = [], []
    try:
        for mode in args.modes.split(","):
            root = base / mode
            staging = root / "staging"
            piles = [
                (f"{args.folders:,} empty folders", lambda s: empty_folders(s / "folders", args.folders)),
                (f"{args.files:,} skipped files", lambda s: skipped_files(s / "files", args.files)),
                (f"a tree {DEPTH:,} folders deep", lambda s: deep_tree(s / "deep") and s / "deep"),
            ]
            (root.parent / f"{mode}-sock").mkdir(parents=True)
            pings = WatchdogPings(root.parent / f"{mode}-sock")
            daemon = Daemon(root, watch={"mode": mode, "settle_s": 1, "poll_interval_s": 2})
            daemon.start(env=pings.receiver.env(WATCHDOG_USEC=str(WATCHDOG_USEC)))
            try:
                for i, (what, build) in enumerate(piles):
                    t0 = time.monotonic()
                    pile = build(staging)
                    print(f"built {what} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
                    row = {"pile (one mv)": what, "mode": mode, **drop_pile(daemon, pings, pile, f"{mode}{i}", staging)}
                    if "polling instead" in daemon.log() and mode == "events":
                        row["mode"] = "events → polling"
                    drops.append(row)
                    print(row, file=sys.stderr)
                alive = daemon.alive()
            finally:
                daemon.stop()
                pings.close()
            assert alive, daemon.log()[-3000:]
            # The folder pile stays in the inbox; the rest goes. A fresh daemon starts on it.
            remove(root / "inbox" / "files")
            remove(root / "inbox" / "deep")
            for folder in ("outbox", "failed", "archive"):
                remove(root / folder)
            rests.append(
                {
                    "inbox holds": f"{args.folders:,} folders",
                    **at_rest(root, mode, args.idle_s, base / f"{mode}-rest-sock"),
                }
            )
            print(rests[-1], file=sys.stderr)
            remove(root)
    finally:
        remove(base)
    model = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "?",
    )
    print(
        f"\nWATCHDOG_USEC 2 s (a ping each second from the main loop), settle_s 1, poll_interval_s 2; "
        f"{psutil.cpu_count()} CPUs ({model}), Python {sys.version.split()[0]}\n"
    )
    table(drops)
    print()
    table(rests)
    print(f"\nCommand: .venv/bin/python benchmarks/junk.py {' '.join(sys.argv[1:])}".rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
