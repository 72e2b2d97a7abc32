"""Small pieces on their own: readiness, completeness checks, names, atomic writes."""

from __future__ import annotations

import errno
import os
import signal
import stat
from pathlib import Path

import pytest

from tests.conftest import SAMPLES
from watcherd.core import naming, safefs, sniff
from watcherd.core.moves import move
from watcherd.core.settings import WatchSettings
from watcherd.intake import readiness
from watcherd.intake.filter import PathFilter
from watcherd.intake.readiness import INCOMPLETE_GRACE, StabilityTracker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fake_stat(size: int, mtime_ns: int) -> os.stat_result:
    fields = [stat.S_IFREG | 0o644, 0, 0, 1, 0, 0, size, 0, 0, 0, 0.0, 0.0, 0.0, 0, mtime_ns, 0]
    return os.stat_result(fields)


def test_a_file_is_ready_only_after_settle_s_without_change() -> None:
    clock = FakeClock()
    state = {"size": 10, "mtime": 1, "complete": True}
    tracker = StabilityTracker(
        2.0, clock=clock, lstat=lambda p: fake_stat(state["size"], state["mtime"]), complete=lambda p: state["complete"]
    )
    path = Path("/inbox/a.jpg")
    tracker.track(path)
    tracker.track(path)  # repeated events change nothing
    assert len(tracker) == 1 and tracker.ready() == []
    clock.now += 1.5
    state.update(size=20, mtime=2)  # still growing
    assert tracker.ready() == []
    clock.now += 0.6
    assert tracker.ready() == []  # the change reset the quiet period at the last look
    clock.now += 2.0
    assert tracker.ready() == [(path, (stat.S_IFREG, 20, 2))]
    assert len(tracker) == 0


def test_an_incomplete_file_waits_then_is_handed_over_after_the_grace() -> None:
    clock = FakeClock()
    tracker = StabilityTracker(1.0, clock=clock, lstat=lambda p: fake_stat(5, 1), complete=lambda p: False)
    tracker.track(Path("/inbox/b.jpg"))
    clock.now += 1.0
    assert tracker.ready() == []
    clock.now += INCOMPLETE_GRACE * 1.0
    assert [p for p, _ in tracker.ready()] == [Path("/inbox/b.jpg")]


def test_vanished_files_are_forgotten() -> None:
    def missing(path: Path) -> os.stat_result:
        raise FileNotFoundError(path)

    clock = FakeClock()
    tracker = StabilityTracker(1.0, clock=clock, lstat=missing)
    tracker.track(Path("/inbox/gone.jpg"))
    assert len(tracker) == 0


def test_filter_uses_include_case_insensitively_and_ignores_every_component() -> None:
    f = PathFilter(WatchSettings(ignore=("drafts",)))
    assert f.wanted(("a", "B.JPG"))
    assert not f.wanted(("a", "b.txt"))
    assert not f.wanted((".watcherd", "processing", "b.jpg"))
    assert not f.wanted(("@eaDir", "b.jpg"))
    assert not f.wanted(("~$b.jpg",))
    assert not f.wanted(("drafts", "b.jpg"))
    assert not PathFilter(WatchSettings(recursive=False)).wanted(("a", "b.jpg"))


@pytest.mark.parametrize("name", ["receipt_zh.jpg", "memo_en.png", "two_pages.tif"])
def test_completeness_follows_the_bytes_written(tmp_path: Path, name: str) -> None:
    data = (SAMPLES / name).read_bytes()
    target = tmp_path / name
    target.write_bytes(b"")
    assert not sniff.looks_complete(target)
    for cut in (len(data) // 3, len(data) - 50):
        target.write_bytes(data[:cut])
        assert not sniff.looks_complete(target), cut
    target.write_bytes(data)
    assert sniff.looks_complete(target)


def test_unknown_content_counts_as_complete(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_text("hello")
    assert sniff.looks_complete(tmp_path / "x.jpg")
    assert sniff.sniff(b"%PDF-1.7\n") == "pdf"


def test_names_get_one_shared_suffix_and_fit_name_max(tmp_path: Path) -> None:
    out, arc = tmp_path / "out", tmp_path / "arc"
    targets = {"json": (out, ".json"), "original": (arc, "")}
    first = naming.choose_names("sub/a.jpg", targets=targets)
    assert first == {"json": out / "sub" / "a.jpg.json", "original": arc / "sub" / "a.jpg"}
    (arc / "sub").mkdir(parents=True)
    (arc / "sub" / "a.jpg").write_bytes(b"x")
    assert naming.choose_names("sub/a.jpg", targets=targets)["json"] == out / "sub" / "a_1.jpg.json"
    long_name = "長" * 84 + ".jpg"  # 256 bytes
    chosen = naming.choose_names(long_name, targets=targets)
    assert len(os.fsencode(chosen["json"].name)) <= 255 and chosen["json"].name.endswith(".jpg.json")


def test_write_new_never_replaces_another_file_and_sets_the_mode(tmp_path: Path) -> None:
    with safefs.folder(tmp_path, []) as fd:
        safefs.write_new(fd, "r.json", b"one", mode=0o640)
        safefs.write_new(fd, "r.json", b"one", mode=0o640)  # the same publish again after a crash: fine
        with pytest.raises(FileExistsError):
            safefs.write_new(fd, "r.json", b"two", mode=0o640)
    assert (tmp_path / "r.json").read_bytes() == b"one"
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp files left


def test_move_is_safe_to_repeat(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a").write_bytes(b"data")
    (tmp_path / "c").write_bytes(b"different")
    with safefs.folder(tmp_path, []) as src, safefs.folder(tmp_path, ["b"]) as dst:
        move(src, "a", dst, "a")
        move(src, "a", dst, "a")  # repeated after a crash: nothing to do
        with pytest.raises(FileExistsError):
            move(src, "c", dst, "a")
    assert (tmp_path / "b" / "a").read_bytes() == b"data" and not (tmp_path / "a").exists()


def test_folders_are_opened_without_following_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "sub").symlink_to(outside)
    with pytest.raises(safefs.Refused):
        with safefs.folder(root, ["sub"], create=True):
            pass
    for bad in ("../x", "a//b", "/abs", "a/./b", ""):
        with pytest.raises(safefs.Refused):
            safefs.parts(bad)


def test_a_sparse_file_crosses_filesystems_as_a_sparse_file(tmp_path: Path) -> None:
    """40 GiB apparent, a few KB of data: copied in a blink, holes kept, no temp file left."""
    import subprocess

    assert os.geteuid() == 0, "mounting a tmpfs needs root (CI runs as root)"
    other = tmp_path / "other-fs"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(other)], check=True)
    try:
        sparse = tmp_path / "sparse.tif"
        with open(sparse, "wb") as f:
            f.write(b"II*\x00head")
            f.seek(40 << 30)
            f.write(b"tail")
        with safefs.folder(tmp_path, []) as src, safefs.folder(other, []) as dst:
            move(src, "sparse.tif", dst, "sparse.tif")
        moved = other / "sparse.tif"
        assert moved.stat().st_size == (40 << 30) + 4 and moved.stat().st_blocks * 512 < 1 << 20
        assert not sparse.exists() and [p.name for p in other.iterdir()] == ["sparse.tif"]
        # Real data bigger than the free space: refused before copying, nothing left behind.
        (tmp_path / "big").write_bytes(os.urandom(5 << 20))
        with safefs.folder(tmp_path, []) as src, safefs.folder(other, []) as dst:
            with pytest.raises(OSError) as caught:
                move(src, "big", dst, "big")
        assert caught.value.errno == errno.ENOSPC and (tmp_path / "big").exists()
        assert [p.name for p in other.iterdir()] == ["sparse.tif"]
    finally:
        subprocess.run(["umount", "-l", str(other)], check=False)


def test_remove_takes_a_tree_deeper_than_the_recursion_limit_and_the_fd_limit(tmp_path: Path) -> None:
    top = tmp_path / "deep"
    with safefs.folder(tmp_path, ["deep"] + ["d"] * 1500, create=True):
        pass
    (tmp_path / "outside").write_bytes(b"keep")
    with safefs.folder(tmp_path, ["deep"] + ["d"] * 700) as fd:
        os.symlink(str(tmp_path / "outside"), "link", dir_fd=fd)
    with safefs.folder(tmp_path, []) as fd:
        safefs.remove(fd, "deep")
    assert not top.exists() and (tmp_path / "outside").read_bytes() == b"keep"


def test_the_parent_never_imports_torch_or_image_libraries() -> None:
    """The daemon's own modules stay light: models and decoders live in the child only."""
    import subprocess
    import sys

    code = (
        "import sys, watcherd.cli, watcherd.daemon.service, watcherd.ops.report; "
        "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime', 'rapidocr', 'numpy', 'PIL') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ready_stops_after_its_budget_and_the_rest_stays_due() -> None:
    """200,000 junk files statted in one ready() call held the main loop 31 s: a call now looks
    at due files only until its budget is spent, and next_due() says the rest are due."""
    clock = FakeClock()
    looked: list[Path] = []

    def lstat(path: Path) -> os.stat_result:
        looked.append(path)
        return fake_stat(5, 1)

    tracker = StabilityTracker(1.0, clock=clock, lstat=lstat, complete=lambda p: True, busy=lambda p: False)
    for i in range(100):
        tracker.track(Path(f"/inbox/{i}.jpg"))
    clock.now += 1.0
    looked.clear()
    first = tracker.ready(budget_s=0.0)  # at least one file per call, so it always progresses
    assert len(first) == 1 and len(looked) == 1
    assert tracker.next_due() is not None and tracker.next_due() <= clock.now  # type: ignore[operator]
    rest = tracker.ready()
    assert len(first) + len(rest) == 100 and len(tracker) == 0 and tracker.next_due() is None


def test_readiness_opens_files_below_the_inbox_without_following_a_swapped_folder(tmp_path: Path) -> None:
    """A folder swapped for a link between a file's lstat and its open: the readiness check and the
    lease probe never open what the link points at (a device node, another user's file)."""
    inbox, elsewhere = tmp_path / "inbox", tmp_path / "elsewhere"
    (inbox / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (inbox / "sub" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 ... \xff\xd9")
    (elsewhere / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 still being written")
    opener = readiness.opener_below(inbox)
    assert sniff.looks_complete(inbox / "sub" / "a.jpg", opener=opener)
    os.rename(inbox / "sub", inbox / "sub.real")
    (inbox / "sub").symlink_to(elsewhere)
    with pytest.raises(safefs.Refused):
        opener(inbox / "sub" / "a.jpg", os.O_RDONLY)
    with pytest.raises(OSError):
        opener(tmp_path / "outside.jpg", os.O_RDONLY)
    # Followed, it would have said "incomplete" (no end marker); refused, the claim decides.
    assert sniff.looks_complete(inbox / "sub" / "a.jpg", opener=opener) is True
    assert sniff.looks_complete(elsewhere / "a.jpg") is False
    previous = signal.signal(signal.SIGIO, signal.SIG_IGN)  # what Intake.start does: the probe runs
    try:
        tracker = StabilityTracker(0.0, root=inbox)
        assert tracker.busy(inbox / "sub.real" / "a.jpg") is False  # a real folder: probed, no writer
        assert tracker.busy(inbox / "sub" / "a.jpg") is None  # through the link: not opened, so unknown
    finally:
        signal.signal(signal.SIGIO, previous)
