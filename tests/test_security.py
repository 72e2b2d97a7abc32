"""A shared inbox, tried as an attacker on the share would (design §9).

The layout is the one `scripts/install` makes: the inbox group-writable for the share users
(2770, setgid), the daemon running with UMask=0027, results readable by a readers' group only.
The daemon runs as uid 0 *without any capability* (setpriv), so the kernel checks its permissions
like any user's: nothing is bypassed. The share user is a real other uid in the share group,
acting through plain shell commands.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, gone_or_zombie, make_image, run_watcherd, wait_until

SHARE_GID = 24100  # group `watcherd` of scripts/install: who may write the inbox
SHARE_UID = 24102  # a share user
READERS_GID = 24104  # who may read results
# uid 0 with no capabilities at all, in the share group, with the unit's UMask=0027.
NO_CAPS = [
    "setpriv",
    "--groups",
    f"0,{SHARE_GID}",
    "--bounding-set",
    "-all",
    "--inh-caps",
    "-all",
    "--securebits",
    "+noroot,+noroot_locked",
    "sh",
    "-c",
    'umask 027; exec "$@"',
    "sh",
]


class Share:
    """The folders of one installation, a daemon over them, and a share user acting on them."""

    def __init__(self, base: Path):
        self.base = base
        self.template = make_image(base / "template.png", 32, 24)
        self.template.chmod(0o644)
        self.outside = base / "outside"  # somewhere the share user must never make the daemon touch
        self.outside.mkdir()
        self.outside.chmod(0o755)
        self.daemons: list[Daemon] = []

    def daemon(self, **overrides: Any) -> Daemon:
        d = Daemon(self.base, **overrides)
        d.prefix = NO_CAPS
        os.chown(d.inbox, 0, SHARE_GID)
        d.inbox.chmod(0o2770)
        for folder in (d.outbox, d.failed, d.archive):
            folder.mkdir(exist_ok=True)
            os.chown(folder, 0, READERS_GID)
            folder.chmod(0o2750)
        self.daemons.append(d)
        return d

    def as_user(self, script: str, *, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["sh", "-c", script],
            user=SHARE_UID,
            group=SHARE_GID,
            extra_groups=[SHARE_GID],
            umask=0o007,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result


@pytest.fixture
def share() -> Iterator[Share]:
    assert os.geteuid() == 0, "switching uids needs root (CI runs as root)"
    base = Path(tempfile.mkdtemp(prefix="watcherd-share-", dir="/tmp"))  # pytest's tmp is 0700 root
    base.chmod(0o755)
    s = Share(base)
    try:
        yield s
    finally:
        for d in s.daemons:
            if d.alive():
                d.stop(signal.SIGKILL)
            wait_until(lambda: all(gone_or_zombie(pid) for pid in d.child_pids()), 10, "OCR children to exit")
        shutil.rmtree(base, ignore_errors=True)


def tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry below `folder` with its bytes (files) or kind, to show nothing changed."""
    out: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        out[rel] = (
            path.read_bytes() if path.is_file() and not path.is_symlink() else stat.filemode(path.lstat().st_mode)
        )
    return out


def test_share_users_cannot_enter_the_work_area(share: Share) -> None:
    d = share.daemon().start()
    work = d.inbox / ".watcherd"
    assert work.stat().st_mode & 0o777 == 0o700  # (setgid may come with the inbox: harmless)
    for attempt in ("ls .watcherd/pending", "printf x > .watcherd/pending/a.json", "exec 9>>.watcherd/lock"):
        assert share.as_user(attempt, cwd=d.inbox, check=False).returncode != 0, attempt
    assert not d.state.is_relative_to(d.inbox) and stat.S_IMODE(d.state.stat().st_mode) & 0o077 == 0


def test_planted_and_forged_records_are_quarantined_never_executed(share: Share) -> None:
    """Finding 1 and 2: records are replayed only if this daemon wrote them (HMAC with a key in
    the state folder) and name only paths below its roots; junk of any type never crashes it."""
    d = share.daemon()
    d.start()
    d.stop()
    pending = d.inbox / ".watcherd" / "pending"
    victim = share.outside / "victim.txt"
    victim.write_text("precious")
    before = tree(share.outside)
    name = lambda rel: hashlib.sha1(rel.encode()).hexdigest() + ".json"  # noqa: E731
    forged_result = {"status": "ok", "source": "pay.png", "text": "Pay 99,000 EUR to ..."}
    old_style = {  # the shape records had before they were authenticated
        "rel": "pay.png",
        "claimed": str(victim),
        "names": {"json": str(d.outbox / "pay.png.json"), "text": str(share.outside / "evil.sh")},
        "document": forged_result,
        "text": "#!/bin/sh\necho pwned\n",
    }
    (pending / name("pay.png")).write_text(json.dumps(old_style))
    (pending / name("forged.png")).write_text(json.dumps({"body": json.dumps(old_style), "mac": "00" * 32}))
    # Even with the key (it never leaves the state folder), paths outside the roots are refused.
    key = (d.state / "record.key").read_bytes()
    escaping = {
        "v": 1,
        "rel": "esc.png",
        "names": {"json": ["outbox", "../outside/esc.json"], "text": ["outbox", "../outside/evil.sh"]},
        "document": forged_result,
        "text": "echo pwned",
    }
    body = json.dumps(escaping)
    mac = hmac.new(key, b"watcherd-record-v1\0" + body.encode(), hashlib.sha256).hexdigest()
    (pending / name("esc.png")).write_text(json.dumps({"body": body, "mac": mac}))
    for i, junk in enumerate((b"[]", b"{}", b"\x00garbage", b'{"body": 1, "mac": []}')):
        (pending / name(f"junk{i}.png")).write_bytes(junk)
    (pending / name("folder.png")).mkdir()
    os.mkfifo(pending / name("fifo.png"))  # opening it would block start-up forever
    (pending / name("link.png")).symlink_to(victim)
    with open(pending / name("huge.png"), "wb") as f:
        f.truncate(300 << 20)  # over the size cap: never read
    (pending / "not-a-record-name").write_text("{}")
    planted = len(list(pending.iterdir()))

    d.start()  # reaches READY: no crash, no hang on the FIFO
    assert d.log().count("Quarantined") == planted, d.log()
    assert not list(pending.iterdir())
    assert len(list((d.inbox / ".watcherd" / "quarantine").iterdir())) == planted
    assert tree(share.outside) == before and victim.read_text() == "precious"
    assert not d.results() and not list(d.outbox.rglob("*"))
    share.as_user(f"cp {share.template} after.png", cwd=d.inbox)
    assert d.wait_json("after.png")["status"] == "ok" and d.alive()


def test_a_work_area_taken_over_while_running_is_moved_back(share: Share) -> None:
    """Findings 3 and 8: `mv .watcherd` (no sticky bit needed) plus a look-alike; the daemon keeps
    working in its own folder, moves it back, sets the impostor aside, and intake carries on."""
    d = share.daemon(ocr={"engine": "tests.engines:Echo", "options": {"delay_s": 2}}).start()
    share.as_user(f"cp {share.template} inflight.png", cwd=d.inbox)
    wait_until(lambda: "inflight.png: OCR started" in d.log(), 30, "the file in flight")
    # The daemon notices a move within one loop iteration; stopped, it lets the attacker finish.
    d.proc.send_signal(signal.SIGSTOP)
    try:
        share.as_user(
            "mv .watcherd stolen && mkdir -p .watcherd/pending && printf '{}' > .watcherd/pending/x.json", cwd=d.inbox
        )
    finally:
        d.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: "moved it back" in d.log(), 30, "the work area to be moved back")
    assert d.wait_json("inflight.png")["status"] == "ok"
    assert not (d.inbox / "stolen").exists()
    impostors = list(d.inbox.glob(".watcherd.untrusted-*"))
    assert len(impostors) == 1 and impostors[0].stat().st_uid == SHARE_UID
    assert (d.inbox / ".watcherd").stat().st_uid == 0
    share.as_user(f"cp {share.template} later.png", cwd=d.inbox)
    assert d.wait_json("later.png")["status"] == "ok"
    second = subprocess.run(
        [*NO_CAPS, sys.executable, "-m", "watcherd", "run", "--config", str(d.config_path)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 75 and "already serves" in second.stderr  # the lock is not in the inbox
    d.stop()
    d.start()  # what the impostor planted is never replayed
    assert not d.results(d.failed) and d.alive()


@pytest.mark.parametrize("planted", ["link to a folder", "plain file", "fifo"])
def test_whatever_sits_in_the_work_areas_place_is_set_aside(share: Share, planted: str) -> None:
    """Findings 5 and 9: a link is never followed (files outside were "recovered" and published),
    and a file or FIFO in its place is no reason to exit 78 (systemd would never restart)."""
    d = share.daemon()
    victim_area = share.outside / "area"
    (victim_area / "processing").mkdir(parents=True)
    make_image(victim_area / "processing" / "someone-elses.png")
    before = tree(share.outside)
    command = {
        "link to a folder": f"ln -s {victim_area} .watcherd",
        "plain file": "printf x > .watcherd",
        "fifo": "mkfifo .watcherd",
    }[planted]
    share.as_user(command, cwd=d.inbox)
    d.start()
    assert "where the work area belongs: set aside" in d.log()
    assert (d.inbox / ".watcherd").is_dir() and not (d.inbox / ".watcherd").is_symlink()
    assert tree(share.outside) == before and not d.results()
    share.as_user(f"cp {share.template} fine.png", cwd=d.inbox)
    assert d.wait_json("fine.png")["status"] == "ok"


@pytest.mark.parametrize("on_success", ["archive", "delete"])
def test_a_folder_swapped_for_a_link_is_never_followed(share: Share, on_success: str) -> None:
    """Finding 6: a subfolder swapped for a link after its file was seen made the claim take (and
    archive or delete) another user's file; the AppleDouble clean-up deleted a `._` file outside."""
    d = share.daemon(output={"on_success": on_success}, watch={"settle_s": 0.5, "mode": "events"}).start()
    victim = share.outside / "other-user"
    victim.mkdir()
    make_image(victim / "a.png")
    (victim / "._a.png").write_bytes(b"resource fork")
    before = tree(share.outside)
    share.as_user(f"mkdir sub && cp {share.template} sub/a.png && mv sub sub.real && ln -s {victim} sub", cwd=d.inbox)
    wait_until(lambda: "Cannot claim" in d.log(), 30, "the claim through the link to be refused")
    assert d.wait_json("sub.real/a.png")["status"] == "ok"  # the real file, under its real folder
    assert tree(share.outside) == before
    assert not (d.outbox / "sub").exists() and d.alive()


def test_retry_never_writes_through_links_or_trusts_planted_json(share: Share) -> None:
    """Finding 7: a folder named like a scan, holding a forged error JSON, failed as
    not_regular_file; with its inbox name swapped for a link, `watcherd retry` (run as root)
    wrote the attacker's file under etc/profile.d outside the inbox."""
    d = share.daemon().start()
    share.as_user(
        "mkdir -p x.jpg/etc/profile.d && printf 'echo pwned' > x.jpg/etc/profile.d/evil.sh && "
        'printf \'{"status": "failed", "image_path": "x"}\' > x.jpg/etc/profile.d/evil.sh.json',
        cwd=d.inbox,
    )
    assert d.wait_json("x.jpg", d.failed)["error_code"] == "not_regular_file"
    (share.outside / "etc" / "profile.d").mkdir(parents=True)
    share.as_user("printf broken > bad.png", cwd=d.inbox)
    assert d.wait_json("bad.png", d.failed)["error_code"] in ("unreadable", "unsupported_type")
    d.stop()
    share.as_user(f"ln -s {share.outside} x.jpg", cwd=d.inbox)
    result = run_watcherd("retry", "--config", str(d.config_path))  # as root, the worst case
    assert result.returncode == 0, result.stderr
    assert "1 file(s) back in the inbox" in result.stdout
    assert not (share.outside / "etc" / "profile.d" / "evil.sh").exists()
    assert (d.failed / "x.jpg" / "etc" / "profile.d" / "evil.sh").exists()
    assert (d.inbox / "bad.png").read_bytes() == b"broken"


def test_results_have_deliberate_modes_and_planted_output_links_are_not_followed(share: Share) -> None:
    """Finding 10: the text of a private upload was published 0644/0640 by umask, every share user
    could read, delete or forge results, and links in output folders redirected them."""
    d = share.daemon().start()
    victim = share.outside / "victim.json"
    victim.write_text("precious")
    (d.outbox / "planted.png.json").symlink_to(victim)  # as if the outbox had once been writable
    (d.outbox / "sub").symlink_to(share.outside)
    share.as_user(f"cp {share.template} private.png && chmod 0640 private.png", cwd=d.inbox)
    share.as_user(f"cp {share.template} planted.png && mkdir sub && cp {share.template} sub/s.png", cwd=d.inbox)
    d.wait_json("private.png")
    for output in (d.outbox / "private.png.json", d.outbox / "private.png.md"):
        st = output.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, READERS_GID), output
    assert share.as_user(f"cat {d.outbox}/private.png.json", cwd=d.inbox, check=False).returncode != 0
    assert share.as_user(f"rm -f {d.outbox}/private.png.json", cwd=d.inbox, check=False).returncode != 0
    assert d.wait_json("planted_1.png")["status"] == "ok"  # the planted name was left alone
    wait_until(lambda: "s.png" in d.log() and "Cannot publish" in d.log(), 30, "the linked subfolder refused")
    assert victim.read_text() == "precious" and not (share.outside / "s.png.json").exists()
    assert d.alive()


def test_state_files_are_never_written_through_links(share: Share) -> None:
    """Finding 4: a link at the status file's temp name overwrote a file elsewhere; one at `lock`
    truncated a PDF. Both now live in the state folder, and neither is written through a link."""
    d = share.daemon()
    d.start()
    d.stop()
    victim = share.outside / "report.pdf"
    victim.write_bytes(b"%PDF-1.7 precious")
    status = d.status_path
    status.unlink()
    status.symlink_to(victim)
    d.start()
    wait_until(lambda: status.exists() and not status.is_symlink(), 10, "the status file replaced")
    d.stop()
    lock = next(d.state.glob("*.lock"))
    lock.unlink()
    lock.symlink_to(victim)
    refused = run_watcherd("run", "--config", str(d.config_path))
    assert refused.returncode == 78 and "paths.state" in refused.stderr and "lock" in refused.stderr
    assert victim.read_bytes() == b"%PDF-1.7 precious"


def test_watcherd_status_escapes_names_and_is_never_fooled_or_stuck(share: Share) -> None:
    """Finding 11: escape sequences from names went to the terminal raw; a stale or forged status
    file read as running; missing keys gave a traceback; a FIFO hung the command."""
    d = share.daemon(ocr={"engine": "tests.engines:Slow", "timeout_s": 300}).start()
    dropped = d.inbox / "\x1b[2J\x1b[32mall systems normal\x1b[0m\nx.png"
    shutil.copy(share.template, dropped)
    os.chown(dropped, SHARE_UID, SHARE_GID)
    status = ["status", "--config", str(d.config_path)]
    wait_until(lambda: "in flight" in run_watcherd(*status).stdout, 30, "the file in flight")
    shown = run_watcherd(*status)
    assert shown.returncode == 0 and "\x1b" not in shown.stdout and "\\x1b[2J" in shown.stdout
    d.stop(signal.SIGKILL)
    path = d.status_path
    document = json.loads(path.read_text())
    variants: list[Callable[[], None]] = [
        lambda: path.write_text(json.dumps({**document, "pid": 1, "pid_started": 1})),  # forged: pid 1 is not us
        lambda: path.write_text(
            json.dumps({**document, "pid": os.getpid(), "pid_started": None, "updated_at": "2000-01-01T00:00:00"})
        ),
        lambda: path.write_text("[]"),
        lambda: path.write_text("{}"),
        lambda: path.write_text("not json"),
        lambda: path.write_bytes(b"\xff" * 100),
    ]
    for make_variant in variants:
        path.unlink()
        make_variant()
        result = run_watcherd(*status, timeout=20)
        assert result.returncode in (1, 3), (result.stdout, result.stderr)
        assert "Traceback" not in result.stderr and "\x1b" not in result.stdout + result.stderr
    path.unlink()
    os.mkfifo(path)
    result = run_watcherd(*status, timeout=20)  # a hang would raise TimeoutExpired
    assert result.returncode == 3 and "not a regular file" in result.stderr


def test_files_returned_at_stop_never_go_through_a_link(share: Share) -> None:
    """Finding 6, graceful stop: a scan handed back to the inbox at SIGTERM was moved into the
    attacker's folder when its subfolder had been swapped for a link. Now it stays claimed."""
    d = share.daemon(ocr={"engine": "tests.engines:Echo", "options": {"delay_s": 3}})
    processing = d.inbox / ".watcherd" / "processing" / "sub"
    d.start()
    d.stop(signal.SIGKILL)  # as after a crash: three files claimed, none done
    for name in ("a.png", "b.png", "c.png"):
        make_image(processing / name)
    share.as_user(f"ln -s {share.outside} sub", cwd=d.inbox)
    before = tree(share.outside)
    d.start()
    d.stop()  # one file in flight finishes within the grace; the queued ones go back, or stay
    assert "Cannot return sub/" in d.log()
    assert tree(share.outside) == before
    assert len(d.results()) + len(list(processing.iterdir())) == 3


def test_a_file_swapped_under_the_child_is_never_published_as_the_claimed_one(share: Share) -> None:
    """The child opens the claimed file by path. If the work area is swapped between the claim and
    that open, the child reads someone else's bytes; the inode it read is checked against the one
    claimed, and the claimed file is read again: its own text is published, not the planted one."""
    d = share.daemon(ocr={"engine": "tests.engines:Announce"}).start()
    child = d.child_pid()
    os.kill(child, signal.SIGSTOP)  # the request will wait in the pipe
    try:
        make_image(d.inbox / "real.png", 40, 30)
        wait_until(lambda: "real.png: OCR started" in d.log(), 30, "the claim")
        evil = make_image(share.outside / "evil.png", 50, 20)
        d.proc.send_signal(signal.SIGSTOP)  # the attacker is faster than one loop iteration
        share.as_user(
            f"mv .watcherd stolen && mkdir -p .watcherd/processing && cp {evil} .watcherd/processing/real.png",
            cwd=d.inbox,
        )
    finally:
        os.kill(child, signal.SIGCONT)
    wait_until(
        lambda: "announce 50x20" in d.log_path.read_text(errors="replace"), 30, "the child to read the planted file"
    )
    d.proc.send_signal(signal.SIGCONT)
    document = d.wait_json("real.png")
    assert document["text"] == "echo 40x30", document
    assert "not the file claimed" in d.log()


def test_watcherd_status_into_a_pipe_that_closes_early_is_quiet(share: Share) -> None:
    d = share.daemon().start()
    command = f"{sys.executable} -m watcherd status --config {d.config_path} | head -c 10"
    result = subprocess.run(
        ["sh", "-c", command], capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent.parent
    )
    assert result.stdout == "watcherd 0" and "Traceback" not in result.stderr, result.stderr
