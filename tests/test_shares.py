"""Network shares and scanner folders against the real daemon: a FUSE mount whose backing folder
changes behind inotify's back (what NFS looks like to a client), a real Samba server fed by
smbclient, bursts, lost events, inotify limits, awkward names and permissions.

The tools are real and required: a missing bindfs or smbd fails the test with the fix in the
message (`scripts/setup --test` installs them), never a silent skip. Servers and mounts are undone
in fixture teardown even when a test fails.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, SAMPLES, Daemon, make_image, wait_until


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: run scripts/setup --test (Debian package {package})")
    return path


def results_named(daemon: Daemon) -> list[str]:
    return sorted(p.relative_to(daemon.outbox).as_posix() for p in daemon.results())


# -- FUSE: bindfs --------------------------------------------------------------------------------


@pytest.fixture
def fuse_inbox(tmp_path: Path) -> Iterator[Path]:
    """tmp_path/inbox is a bindfs mount of tmp_path/backing; yields the backing folder.

    Writes into the backing folder reach the mount without any inotify event on it, like files
    written on the NFS server or by another client. Requested before `daemon_factory`, so it is
    torn down after the daemons are stopped.
    """
    need("bindfs", "bindfs")
    backing, mount = tmp_path / "backing", tmp_path / "inbox"
    backing.mkdir()
    mount.mkdir()
    subprocess.run(["bindfs", str(backing), str(mount)], check=True, capture_output=True)
    try:
        wait_until(lambda: os.path.ismount(mount), 10, "the bindfs mount")
        yield backing
    finally:
        unmount = shutil.which("fusermount3") or shutil.which("fusermount") or "umount"
        if subprocess.run([unmount, "-u", str(mount)], capture_output=True).returncode != 0:
            subprocess.run([unmount, "-uz", str(mount)], capture_output=True)  # busy: detach lazily


def test_auto_mode_polls_a_fuse_mount_and_finds_files_written_behind_it(fuse_inbox: Path, daemon_factory) -> None:
    daemon = daemon_factory(watch={"mode": "auto", "poll_interval_s": 0.2, "settle_s": 0.3}).start()
    assert "Watch mode: polling (watch.mode: auto, and the inbox is on fuse" in daemon.log()
    names = [f"direct{i}.png" for i in range(20)] + [f"scanner1/deep/page{i}.png" for i in range(20)]
    for i, name in enumerate(names):
        make_image(fuse_inbox / name, 30 + i, 10)  # behind the mount: no inotify event on it
    for name in names:
        assert daemon.wait_json(name, daemon.outbox)["status"] == "ok"
    assert results_named(daemon) == sorted(f"{n}.json" for n in names)
    wait_until(lambda: not any(p.is_file() for p in fuse_inbox.rglob("*.png")), 10, "every original archived")
    # A folder created after start, filled at once, is found too.
    make_image(fuse_inbox / "later" / "one.png", 99, 10)
    assert daemon.wait_json("later/one.png")["text"] == "echo 99x10"


def test_events_on_a_fuse_mount_miss_files_written_behind_it_until_the_rescan(fuse_inbox: Path, daemon_factory) -> None:
    """Why auto polls such mounts: with events, only the periodic rescan ever finds these files."""
    daemon = daemon_factory(watch={"mode": "events", "settle_s": 0.3, "rescan_interval_s": 6}).start()
    assert "Watch mode: events (watch.mode: events" in daemon.log()
    make_image(fuse_inbox / "behind.png", 41, 10)  # another host writing on the server
    make_image(daemon.inbox / "through.png", 42, 10)  # written through the mount: an event
    assert daemon.wait_json("through.png", daemon.outbox, timeout=5)["status"] == "ok"
    # Events are handled in order and both files settle alike, so had `behind.png` raised an
    # event it would have been taken before `through.png` was finished.
    assert (fuse_inbox / "behind.png").exists()
    assert "behind.png" not in daemon.log()
    assert daemon.wait_json("behind.png", daemon.outbox, timeout=20)["status"] == "ok"  # the rescan
    log = daemon.log()
    assert log.index("through.png: OCR started") < log.index("behind.png: OCR started")


# -- Samba -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SambaServer:
    def __init__(self, root: Path, share: Path):
        self.root = root
        self.share = share
        self.port = free_port()
        self.conf = root / "smb.conf"
        for sub in ("private", "lock", "state", "cache", "pid", "ncalrpc"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            "[global]\n"
            "  interfaces = lo\n  bind interfaces only = yes\n"
            f"  smb ports = {self.port}\n"
            "  server role = standalone server\n  map to guest = Bad User\n  guest account = root\n"
            f"  private dir = {root}/private\n  lock directory = {root}/lock\n"
            f"  state directory = {root}/state\n  cache directory = {root}/cache\n"
            f"  pid directory = {root}/pid\n  ncalrpc dir = {root}/ncalrpc\n"
            f"  log file = {root}/smbd.log\n"
            "  load printers = no\n  printing = bsd\n  printcap name = /dev/null\n  disable spoolss = yes\n"
            "[inbox]\n"
            f"  path = {share}\n  read only = no\n  guest ok = yes\n"
        )
        self.proc = subprocess.Popen(
            [need("smbd", "samba"), "-F", "--no-process-group", "-s", str(self.conf)],
            stdout=open(root / "smbd.out", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # smbd signals its whole process group when it stops: not ours
        )
        wait_until(self._listening, 30, f"smbd on port {self.port} ({self._output()})")

    def _output(self) -> str:
        return (self.root / "smbd.out").read_text(errors="replace")[-2000:]

    def _listening(self) -> bool:
        assert self.proc.poll() is None, f"smbd exited: {self._output()}"
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def client(self, command: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [need("smbclient", "smbclient"), "-p", str(self.port), "-N", "//127.0.0.1/inbox", "-c", command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def put(self, local: Path, remote: str) -> None:
        proc = self.client(f'put "{local}" "{remote}"')
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out.decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def samba(tmp_path: Path) -> Iterator[SambaServer]:
    need("smbclient", "smbclient")
    share = tmp_path / "inbox"
    share.mkdir(exist_ok=True)
    server = SambaServer(tmp_path / "samba", share)
    try:
        yield server
    finally:
        server.stop()


def test_samba_uploads_including_a_slow_one_are_processed_once_when_complete(
    samba: SambaServer, daemon_factory, tmp_path: Path
) -> None:
    settle = 0.3
    daemon = daemon_factory(watch={"mode": "auto", "settle_s": settle}).start()
    data = (SAMPLES / "receipt_zh.jpg").read_bytes()
    quick = {f"quick{i}.png": make_image(tmp_path / "upload" / f"quick{i}.png", 60 + i, 10) for i in range(3)}
    for name, local in quick.items():
        samba.put(local, name)

    # The slow client: smbd creates slow.jpg at 0 bytes as soon as the upload starts, then the
    # data trickles in with pauses longer than settle_s, the whole upload lasting far longer than
    # the grace an incomplete-looking file gets (INCOMPLETE_GRACE x settle_s).
    fifo = tmp_path / "upload" / "slow.fifo"
    os.mkfifo(fifo)
    upload = samba.client(f'put "{fifo}" slow.jpg')
    target = daemon.inbox / "slow.jpg"
    sizes: list[int] = []
    with open(fifo, "wb", buffering=0) as pipe:
        wait_until(target.exists, 30, "smbd to create slow.jpg")
        sizes.append(target.stat().st_size)
        held = time.monotonic()
        while time.monotonic() - held < 8 * settle:  # the client "thinking" with the file at 0 bytes
            time.sleep(settle / 3)
            sizes.append(target.stat().st_size if target.exists() else -1)  # -1: taken while uploading
        step = len(data) // 4 + 1
        for i in range(0, len(data), step):
            pipe.write(data[i : i + step])
            time.sleep(2 * settle)  # a pause between pages, longer than settle_s
    out, _ = upload.communicate(timeout=60)
    assert upload.returncode == 0, out.decode(errors="replace")
    assert set(sizes) == {0}, f"slow.jpg was taken while smbd still had it open: {sizes}"

    result = daemon.wait_json("slow.jpg", daemon.outbox)
    assert result["status"] == "ok"
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    for name in quick:
        assert daemon.wait_json(name, daemon.outbox)["status"] == "ok"
    assert results_named(daemon) == sorted(f"{n}.json" for n in [*quick, "slow.jpg"])
    assert daemon.results(daemon.failed) == []
    log = daemon.log()
    for name in [*quick, "slow.jpg"]:
        assert log.count(f"{name}: OCR started") == 1, log


# -- bursts and repeated events --------------------------------------------------------------------


def test_a_burst_of_1000_files_gives_exactly_1000_results_while_a_nas_touches_them(daemon_factory) -> None:
    daemon = daemon_factory(watch={"settle_s": 0.3}).start()
    names = [f"burst/{i // 100}/scan{i:04d}.png" for i in range(1000)]
    template = make_image(daemon.root / "template.png", 8, 8).read_bytes()
    for name in names:
        path = daemon.inbox / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(template)
    processing = daemon.inbox / ".watcherd" / "processing"
    done = threading.Event()

    def nas() -> None:
        # Metadata noise on files waiting, queued and in flight, like a NAS indexer: every call
        # raises an inotify event, none changes size or mtime (a file whose mtime keeps moving is
        # rightly never ready).
        while not done.is_set():
            for root in (daemon.inbox / "burst", processing):
                with contextlib.suppress(OSError):  # files and folders come and go meanwhile
                    for path in list(root.rglob("*.png"))[:50]:
                        with contextlib.suppress(OSError):
                            st = path.stat()
                            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
                            os.chmod(path, 0o644)
            done.wait(0.01)  # the indexer's pace; returns at once when the test is over

    toucher = threading.Thread(target=nas)
    toucher.start()
    try:
        wait_until(lambda: len(daemon.results()) >= 1000, 240, "1000 results")
    finally:
        done.set()
        toucher.join()
    assert results_named(daemon) == sorted(f"{n}.json" for n in names)
    assert daemon.results(daemon.failed) == []
    log = daemon.log()
    assert log.count(": OCR started") == 1000
    assert len(list(daemon.archive.rglob("*.png"))) == 1000


# -- lost events, inotify limits -------------------------------------------------------------------

QUEUED_EVENTS = Path("/proc/sys/fs/inotify/max_queued_events")


def test_an_event_queue_overflow_triggers_a_rescan_with_one_warning(daemon_factory) -> None:
    """The kernel reads max_queued_events when an inotify instance is created, so a small value
    set while the daemon starts gives it a tiny queue; the machine's value is restored at once."""
    daemon = daemon_factory(watch={"settle_s": 0.3, "rescan_interval_s": 3600})
    original = QUEUED_EVENTS.read_text()
    try:
        QUEUED_EVENTS.write_text("16\n")
        daemon.start(wait_ready=False)
        wait_until(lambda: "Watch mode:" in daemon.log() or not daemon.alive(), 60, "the watch to start")
    finally:
        QUEUED_EVENTS.write_text(original)
    wait_until(lambda: " ready: " in daemon.log(), 60, "the child to load")
    names = [f"flood{i:03d}.png" for i in range(300)]
    template = make_image(daemon.root / "template.png", 8, 8).read_bytes()
    for name in names:
        (daemon.inbox / name).write_bytes(template)
    wait_until(lambda: len(daemon.results()) >= len(names), 120, f"{len(names)} results")
    assert results_named(daemon) == sorted(f"{n}.json" for n in names)
    log = daemon.log()
    assert log.count("WARNING inotify event queue overflowed") == 1, log[-3000:]
    assert "Inotify queue overflowed" not in log  # watchdog's own warnings are folded into ours


class WrappedDaemon(Daemon):
    """The daemon started through a wrapper command (`prefix` + the usual command line)."""

    def __init__(self, root: Path, prefix: list[str], **overrides: Any):
        super().__init__(root, **overrides)
        self.prefix = prefix


def in_user_namespace(limits: dict[str, int]) -> list[str]:
    """A new user namespace whose inotify limits are set low: the per-namespace limits
    (/proc/sys/user/max_inotify_*) leave the machine's own untouched."""
    need("unshare", "util-linux")
    sets = "; ".join(f"echo {v} > /proc/sys/user/max_inotify_{k}" for k, v in limits.items())
    return ["unshare", "-U", "-r", "sh", "-c", f'{sets}; exec "$@"', "sh"]


def without_capabilities() -> list[str]:
    """Root without any capability obeys permission bits like any other account (uid 0 is the
    owner of root's files, so mode 000 locks it out), and keeps reaching the venv's interpreter."""
    need("setpriv", "util-linux")
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]


@pytest.mark.parametrize(
    "limits, why",
    [
        ({"instances": 0}, "no inotify instance left"),
        ({"watches": 3}, "inotify watch limit reached"),
    ],
    ids=["max_user_instances", "max_user_watches"],
)
def test_when_inotify_runs_out_the_daemon_polls_instead_of_going_blind(tmp_path: Path, limits, why) -> None:
    for i in range(5):
        (tmp_path / "inbox" / f"dept{i}" / "sub").mkdir(parents=True)
    daemon = WrappedDaemon(
        tmp_path, in_user_namespace(limits), watch={"mode": "events", "settle_s": 0.3, "poll_interval_s": 0.2}
    )
    try:
        daemon.start()
        log = daemon.log()
        assert f"WARNING inotify failed: {why}" in log, log
        assert log.count("WARNING inotify failed") == 1
        assert "Watch mode: polling" in log and "(polling); results to" in log
        make_image(daemon.inbox / "dept4" / "sub" / "deep.png", 44, 10)
        make_image(daemon.inbox / "top.png", 45, 10)
        assert daemon.wait_json("dept4/sub/deep.png")["text"] == "echo 44x10"
        assert daemon.wait_json("top.png")["text"] == "echo 45x10"
    finally:
        if daemon.alive():
            daemon.stop(signal.SIGKILL)


# -- names from shares -----------------------------------------------------------------------------


def test_names_from_shares_round_trip(daemon_factory) -> None:
    daemon = daemon_factory().start()
    nfc = unicodedata.normalize("NFC", "Café résumé.png")
    nfd = unicodedata.normalize("NFD", nfc)  # how a Mac sends it over SMB/AFP
    assert nfc != nfd
    long_ascii = "a" * 250 + ".png"  # 254 bytes: fine as a file, too long with `.json`
    long_cjk = "掃描" * 41 + ".tif"  # 250 bytes of UTF-8: the cut must not split a character
    latin1 = os.fsdecode(b"scans/r\xe9sum\xe9.png")
    cases = {nfc: 20, nfd: 21, long_ascii: 22, long_cjk: 23, latin1: 24}
    for name, width in cases.items():
        make_image(daemon.inbox / name, width, 10, fmt="TIFF" if name.endswith(".tif") else "PNG")
    companion = make_image(daemon.inbox / f"._{nfd}", 25, 10)  # AppleDouble: never a scan

    wait_until(lambda: len(daemon.results()) >= len(cases), 60, f"{len(cases)} results ({daemon.log()[-2000:]})")
    documents = {}
    for path in daemon.results():
        raw = path.read_bytes()
        document = json.loads(raw.decode("utf-8"))  # strict UTF-8: valid JSON whatever the name
        documents[document.get("source_b64") or document["source"]] = (path, document)
    assert all(len(os.fsencode(p.name)) <= 255 for p in daemon.outbox.rglob("*"))
    assert sorted(d["text"] for _, d in documents.values()) == [f"echo {w}x10" for w in sorted(cases.values())]

    # NFC and NFD are different names on Linux: two files, two results, each kept exactly.
    assert documents[nfc][1]["text"] == "echo 20x10" and documents[nfc][0].name == f"{nfc}.json"
    assert documents[nfd][1]["text"] == "echo 21x10" and documents[nfd][0].name == f"{nfd}.json"
    assert (daemon.archive / nfc).exists() and (daemon.archive / nfd).exists()
    # Long names: shortened (by bytes, on a character boundary) so that `.json` fits NAME_MAX; the
    # archived original takes the same short name so the pair stays together; `source` keeps all.
    for name in (long_ascii, long_cjk):
        json_path, document = documents[name]
        short = json_path.name.removesuffix(".json")
        assert short.endswith("~." + name.rsplit(".", 1)[1]) and name.startswith(short.split("~")[0])
        assert document["source"] == name
        assert document["image_path"] == str(daemon.archive / short) and (daemon.archive / short).exists()
    # Non-UTF-8: escaped in `source`, exact in `source_b64`, bytes kept on disk.
    b64 = base64.b64encode(os.fsencode(latin1)).decode()
    json_path, document = documents[b64]
    assert document["source"] == "scans/r\\xe9sum\\xe9.png"
    assert os.fsencode(json_path) == os.fsencode(daemon.outbox) + b"/scans/r\xe9sum\xe9.png.json"
    # The AppleDouble companion was never taken for a scan, and left with its file.
    wait_until(lambda: not companion.exists(), 10, "the companion to leave with its file")
    assert f"._{nfd}" not in daemon.log() and not (daemon.failed / f"._{nfd}").exists()


# -- permissions -----------------------------------------------------------------------------------


def test_check_names_the_folder_and_the_missing_permission(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    for folder in (daemon.outbox, daemon.failed, daemon.archive):
        folder.mkdir()
    os.chmod(daemon.archive, 0o555)  # archive on a share mounted read-only for us, say
    check = [*without_capabilities(), sys.executable, "-m", "watcherd", "check", "--config", str(daemon.config_path)]

    result = subprocess.run(check, capture_output=True, text=True, cwd=REPO)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert f"ok    paths.inbox   {daemon.inbox} (list, create, rename, delete: allowed)" in out
    assert f"ok    paths.outbox  {daemon.outbox} (write: allowed)" in out
    assert (
        f"FAIL  paths.archive {daemon.archive}: cannot write files: missing write permission on the folder "
        f"(Permission denied) (mode dr-xr-xr-x"
    ) in out
    assert f"ok    filesystem    {daemon.inbox} is on " in out
    assert "ok    watch         events: watch.mode: events" in out
    assert "max_user_watches" in out and "max_user_instances" in out

    os.chmod(daemon.archive, 0o755)
    os.chmod(daemon.inbox, 0o555)
    out = subprocess.run(check, capture_output=True, text=True, cwd=REPO).stdout
    assert (
        f"FAIL  paths.inbox   {daemon.inbox}: cannot create, rename or delete files: missing write "
        f"permission on the folder"
    ) in out
    os.chmod(daemon.inbox, 0o311)  # write and search, but no read
    out = subprocess.run(check, capture_output=True, text=True, cwd=REPO).stdout
    assert f"FAIL  paths.inbox   {daemon.inbox}: cannot list files: missing read permission on the folder" in out
    os.chmod(daemon.inbox, 0o755)
    assert subprocess.run(check, capture_output=True, text=True, cwd=REPO).returncode == 0


def test_an_unreadable_folder_and_an_unclaimable_file_are_reported_once(tmp_path: Path) -> None:
    watch = {"mode": "polling", "poll_interval_s": 0.1, "settle_s": 0.2, "rescan_interval_s": 0.3}
    daemon = WrappedDaemon(tmp_path, without_capabilities(), watch=watch)
    locked = daemon.inbox / "locked"
    stuck = daemon.inbox / "readonly"
    make_image(locked / "hidden.png")
    make_image(stuck / "stuck.png")
    secret = make_image(daemon.inbox / "secret.png", 33, 10)
    os.chmod(locked, 0o000)
    os.chmod(stuck, 0o555)  # files can be read, not moved out
    os.chmod(secret, 0o000)  # claimable (its folder is writable), but unreadable
    try:
        daemon.start()
        error = daemon.wait_json("secret.png", daemon.failed)
        assert error["error_code"] == "unreadable"
        for i in range(3):  # many polls and several rescans later
            make_image(daemon.inbox / f"good{i}.png", 40 + i, 10)
            assert daemon.wait_json(f"good{i}.png", daemon.outbox)["status"] == "ok"
        assert daemon.alive(), daemon.log()
        log = daemon.log()
        assert log.count(f"Cannot list {locked}: Permission denied") == 1, log
        assert log.count(f"Cannot claim files in {stuck}: missing write permission on the folder") == 1, log
        assert log.count("secret.png: OCR started") == 1
        assert (stuck / "stuck.png").exists()
    finally:
        if daemon.alive():
            daemon.stop(signal.SIGKILL)
        for folder in (locked, stuck):
            os.chmod(folder, 0o755)  # so that pytest can clean up
