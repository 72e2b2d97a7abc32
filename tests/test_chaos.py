"""Fault injection: each test injects a fault into the real daemon and checks design §1's
invariants — one JSON per input, the original in exactly one place, the daemon alive (or cleanly
restarted). Run alone with `make chaos`, which prints the table; CHAOS_ITERATIONS sets the kill -9
loop's length (default 50).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Daemon, gone_or_zombie, make_image, wait_until
from tests.engines import CHATTY_WIDTH, CLOSE_PIPE_WIDTH, MEMORY_ERROR_WIDTH
from watcherd.core import safefs

pytestmark = pytest.mark.chaos

ITERATIONS = int(os.environ.get("CHAOS_ITERATIONS", "50"))


def audit(daemon: Daemon, names: list[str]) -> tuple[int, int]:
    """(lost, duplicated) over `names`: each needs exactly one JSON and one original, in outputs.

    A duplicate would carry a clash suffix (`a_1.png`), so those names are counted too.
    """
    lost = duplicated = 0
    for name in names:
        stem, _, ext = name.rpartition(".")
        patterns = (name, f"{stem}_*.{ext}")
        jsons = [
            p
            for folder in (daemon.outbox, daemon.failed)
            if folder.exists()
            for pattern in patterns
            for p in folder.glob(f"{pattern}.json")
        ]
        originals = [
            p
            for folder in (daemon.archive, daemon.failed, daemon.inbox)
            if folder.exists()
            for pattern in patterns
            for p in folder.glob(pattern)
        ]
        lost += not jsons or not originals
        duplicated += max(0, len(jsons) - 1) + max(0, len(originals) - 1)
    return lost, duplicated


def tally(daemon: Daemon, names: list[str]) -> tuple[int, int, int]:
    """(files, lost, duplicated) for the table, from what `audit` finds over `names` now."""
    return (len(names), *audit(daemon, names))


def record(
    request: pytest.FixtureRequest, fault: str, iterations: int, counts: tuple[int, int, int], outcome: str
) -> None:
    """A row of `make chaos`'s table; `counts` as `tally` computes them, never typed in."""
    files, lost, duplicated = counts
    request.config.stash.setdefault(CHAOS_ROWS, []).append((fault, iterations, files, lost, duplicated, outcome))


CHAOS_ROWS = pytest.StashKey[list]()


def wait_all(daemon: Daemon, names: list[str], timeout: float = 60) -> None:
    def done() -> bool:
        return all((daemon.outbox / f"{n}.json").exists() or (daemon.failed / f"{n}.json").exists() for n in names)

    wait_until(done, timeout, f"results for {len(names)} files")


def test_child_faults_each_cost_at_most_their_own_file(daemon_factory, request, tmp_path: Path) -> None:
    daemon = daemon_factory(
        ocr={"engine": "tests.engines:Misbehaving", "options": {"exit_once": str(tmp_path / "exited")}}
    ).start()
    wait_until(lambda: (tmp_path / "exited").exists() and len(daemon.child_pids()) >= 2, 30, "exit after load")
    cases = {
        "memory.png": (MEMORY_ERROR_WIDTH, "engine_error"),
        "chatty.png": (CHATTY_WIDTH, "ok"),
        "closepipe.png": (CLOSE_PIPE_WIDTH, "child_crashed"),
        "plain.png": (40, "ok"),
    }
    for name, (width, _) in cases.items():
        make_image(daemon.inbox / name, width, 10)
    wait_all(daemon, list(cases))
    for name, (_, expected) in cases.items():
        document = daemon.wait_json(name)
        assert (document.get("error_code") or document["status"]) == expected, (name, document)
    lost, duplicated = audit(daemon, list(cases))
    assert (lost, duplicated) == (0, 0) and daemon.alive()
    record(request, "child exits right after loading", 1, tally(daemon, []), "respawned, then served")
    record(request, "child raises MemoryError", 1, tally(daemon, ["memory.png"]), "engine_error, child kept")
    record(request, "child prints 4 MB to stdout", 1, tally(daemon, ["chatty.png"]), "ok (stdout goes to the log)")
    record(
        request, "child closes its protocol pipe", 1, tally(daemon, ["closepipe.png"]), "retried once, child_crashed"
    )


def test_child_sigkilled_mid_page_is_retried_on_a_new_child(daemon_factory, request) -> None:
    daemon = daemon_factory(ocr={"engine": "tests.engines:Echo", "options": {"delay_s": 2}}).start()
    make_image(daemon.inbox / "victim.png", 44, 10)
    wait_until(lambda: "victim.png: OCR started" in daemon.log(), 30)
    os.kill(daemon.child_pid(), signal.SIGKILL)
    result = daemon.wait_json("victim.png")
    assert result["status"] == "ok" and result["attempts"] == 2
    assert audit(daemon, ["victim.png"]) == (0, 0) and daemon.alive()
    record(request, "child SIGKILLed mid-page", 1, tally(daemon, ["victim.png"]), "retried on a new child, ok")


def test_hung_and_segfaulting_children(daemon_factory, request) -> None:
    from tests.engines import HANG_WIDTH, SEGFAULT_WIDTH

    daemon = daemon_factory(ocr={"engine": "tests.engines:Hang", "timeout_s": 1}).start()
    make_image(daemon.inbox / "hang.png", HANG_WIDTH, 10)
    assert daemon.wait_json("hang.png")["error_code"] == "timeout"
    assert audit(daemon, ["hang.png"]) == (0, 0)
    daemon.stop()
    daemon.configure(ocr={"engine": "tests.engines:Segfault"})
    daemon.start()
    make_image(daemon.inbox / "segv.png", SEGFAULT_WIDTH, 10)
    assert daemon.wait_json("segv.png")["error_code"] == "child_crashed"
    assert audit(daemon, ["segv.png"]) == (0, 0) and daemon.alive()
    record(
        request,
        "child hung in native code, signals blocked",
        1,
        tally(daemon, ["hang.png"]),
        "timeout, process group killed",
    )
    record(request, "child segfaults", 1, tally(daemon, ["segv.png"]), "retried once, child_crashed")


def test_daemon_kill_9_at_random_moments_loses_and_duplicates_nothing(daemon_factory, request) -> None:
    seed = int(os.environ.get("CHAOS_SEED", time.time()))
    rng = random.Random(seed)
    daemon = daemon_factory(ocr={"engine": "tests.engines:Echo"}, watch={"settle_s": 0.05})
    names: list[str] = []
    stages = {"queued": 0, "claimed": 0, "publishing": 0}  # kills that caught a file in each stage
    work = daemon.inbox / ".watcherd"
    for i in range(ITERATIONS):
        for j in range(12):
            name = f"k{i:03}_{j:02}.png"
            make_image(daemon.inbox / name, 20 + j, 10)
            names.append(name)
        daemon.start(wait_ready=rng.random() < 0.7)  # sometimes kill it while it still loads
        time.sleep(rng.uniform(0, 0.4))  # the random moment of the kill is the point of this test
        child_pids = daemon.child_pids()
        daemon.stop(signal.SIGKILL)
        stages["queued"] += any(p.suffix == ".png" for p in daemon.inbox.iterdir())
        stages["claimed"] += (work / "processing").exists() and any((work / "processing").iterdir())
        stages["publishing"] += (work / "pending").exists() and any((work / "pending").iterdir())
        wait_until(lambda: all(gone_or_zombie(p) for p in child_pids), 10, "children to die with the daemon")
    daemon.start()
    wait_all(daemon, names, timeout=120)
    lost, duplicated = audit(daemon, names)
    caught = ", ".join(f"{stage} {n}" for stage, n in stages.items())
    record(
        request,
        f"daemon kill -9 at random moments (seed {seed})",
        ITERATIONS,
        (len(names), lost, duplicated),
        f"restarted each time; kills that caught a file {caught}",
    )
    assert (lost, duplicated) == (0, 0), f"seed {seed}"
    if ITERATIONS >= 50:  # at this length these are caught 10-25 times each; mid-publication only
        assert stages["queued"] and stages["claimed"], stages  # ~5: the next test makes sure of it
    assert not list((daemon.inbox / ".watcherd" / "pending").iterdir())


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    assert os.geteuid() == 0, "mounting a tmpfs needs root (CI runs as root)"
    mounts: list[Path] = []

    def mount(path: Path, size: str = "256k") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounts.append(path)
        return path

    yield mount
    for path in reversed(mounts):
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_daemon_kill_9_between_json_and_archive_then_restart(daemon_factory, request, small_tmpfs) -> None:
    """The narrowest window, made wide: the archive is read-only, so the JSON is written and the
    original cannot move; kill -9 there, make the archive writable, restart."""
    daemon = daemon_factory()
    archive = small_tmpfs(daemon.archive, "4m")
    daemon.start()
    subprocess.run(["mount", "-o", "remount,ro", str(archive)], check=True)
    make_image(daemon.inbox / "window.png", 42, 10)
    wait_until(lambda: "Cannot write results" in daemon.log(), 30, "the archive move to fail")
    assert (daemon.outbox / "window.png.json").exists()  # the JSON is out ...
    assert (daemon.inbox / ".watcherd" / "processing" / "window.png").exists()  # ... the original is not
    assert len(list((daemon.inbox / ".watcherd" / "pending").iterdir())) == 1
    first = daemon.outbox / "window.png.json"
    before = first.read_bytes()
    daemon.stop(signal.SIGKILL)
    subprocess.run(["mount", "-o", "remount,rw", str(archive)], check=True)
    daemon.start()
    wait_until(lambda: (daemon.archive / "window.png").exists(), 30, "the recovered publication")
    assert first.read_bytes() == before  # finished, not redone: the same JSON, no window_1.png.json
    assert audit(daemon, ["window.png"]) == (0, 0)
    assert not list((daemon.inbox / ".watcherd" / "pending").iterdir())
    record(
        request,
        "daemon kill -9 after the JSON, before the original moved",
        1,
        tally(daemon, ["window.png"]),
        "publication finished on restart",
    )


def test_outbox_full_keeps_files_safe_then_resumes(daemon_factory, request, small_tmpfs) -> None:
    daemon = daemon_factory()
    outbox = small_tmpfs(daemon.outbox)
    filler = outbox / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):  # fill it up
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    daemon.start()
    names = [f"full{i}.png" for i in range(5)]
    for i, name in enumerate(names):
        make_image(daemon.inbox / name, 20 + i, 10)
    wait_until(lambda: "Cannot write results" in daemon.log(), 30, "the disk-full error")
    assert daemon.log().count("Cannot write results") == 1
    processing = daemon.inbox / ".watcherd" / "processing"
    held = wait_until(
        lambda: (
            [p for p in processing.iterdir()]
            if daemon.log().count("OCR started") == len(list(processing.iterdir()))
            else None
        ),
        10,
        "the claimed files to be held",
    )
    assert 1 <= len(held) <= 2  # the one that failed to publish, and the one the child had already begun
    assert len(held) + sum((daemon.inbox / n).exists() for n in names) == len(names)  # the rest wait in the inbox
    assert daemon.results() == []
    filler.unlink()
    wait_all(daemon, names)
    assert audit(daemon, names) == (0, 0) and daemon.alive()
    assert "Results can be written again" in daemon.log()
    record(request, "outbox filesystem full, then freed", 1, tally(daemon, names), "held, one error, resumed")


def test_outbox_read_only_then_writable(daemon_factory, request, small_tmpfs) -> None:
    daemon = daemon_factory()
    outbox = small_tmpfs(daemon.outbox, "4m")
    daemon.start()  # (a read-only outbox at start is refused: see test_check_* in test_shares.py)
    subprocess.run(["mount", "-o", "remount,ro", str(outbox)], check=True)
    make_image(daemon.inbox / "ro.png")
    wait_until(lambda: "Cannot write results" in daemon.log(), 30)
    subprocess.run(["mount", "-o", "remount,rw", str(outbox)], check=True)
    daemon.wait_json("ro.png")
    assert audit(daemon, ["ro.png"]) == (0, 0) and daemon.alive()
    record(
        request,
        "outbox not writable (read-only), then writable",
        1,
        tally(daemon, ["ro.png"]),
        "held, one error, resumed",
    )


def test_inbox_deleted_and_recreated(daemon_factory, request) -> None:
    daemon = daemon_factory(watch={"rescan_interval_s": 1}).start()
    make_image(daemon.inbox / "before.png")
    daemon.wait_json("before.png")
    shutil.rmtree(daemon.inbox)
    daemon.inbox.mkdir()
    make_image(daemon.inbox / "after.png")
    daemon.wait_json("after.png")
    assert audit(daemon, ["before.png", "after.png"]) == (0, 0) and daemon.alive()
    record(
        request,
        "inbox folder deleted and recreated",
        1,
        tally(daemon, ["before.png", "after.png"]),
        "found by the rescan",
    )


def test_hostile_inputs(daemon_factory, request, samples: Path, tmp_path: Path) -> None:
    import pypdfium2 as pdfium

    from tests.test_daemon import bomb_png

    daemon = daemon_factory(ocr={"engine": "tests.engines:Echo", "max_pages": 3}, watch={"settle_s": 0.2}).start()
    inbox = daemon.inbox
    expected = {}
    (inbox / "empty.jpg").write_bytes(b"")
    expected["empty.jpg"] = "unreadable"
    (inbox / "truncated.jpg").write_bytes((samples / "receipt_zh.jpg").read_bytes()[:3000])
    expected["truncated.jpg"] = "unreadable"
    make_image(inbox / "tiny.png", 1, 1)
    expected["tiny.png"] = "ok"
    bomb_png(inbox / "bomb.png")
    expected["bomb.png"] = "too_large"
    (inbox / "text.jpg").write_text("hello")
    expected["text.jpg"] = "unsupported_type"
    pdf = pdfium.PdfDocument.new()
    for _ in range(5):
        pdf.new_page(200, 300)
    pdf.save(str(tmp_path / "many.pdf"))
    shutil.copy(tmp_path / "many.pdf", inbox / "many.pdf")
    expected["many.pdf"] = "too_large"
    (inbox / "shadow.jpg").symlink_to("/etc/shadow")
    expected["shadow.jpg"] = "not_regular_file"
    os.mkfifo(inbox / "fifo.jpg")
    expected["fifo.jpg"] = "not_regular_file"
    (inbox / "x.jpg").mkdir()
    expected["x.jpg"] = "not_regular_file"
    outside = make_image(tmp_path / "outside.png", 33, 10)
    os.link(outside, inbox / "hardlink.png")
    expected["hardlink.png"] = "ok"
    wait_all(daemon, list(expected))
    for name, code in expected.items():
        document = daemon.wait_json(name)
        assert (document.get("error_code") or document["status"]) == code, (name, document)
    assert outside.exists() and Path("/etc/shadow").exists()
    assert audit(daemon, list(expected)) == (0, 0) and daemon.alive()
    record(
        request,
        "hostile inputs (empty, truncated, 1x1, bomb, text, 5-page PDF over max_pages, "
        "symlink to /etc/shadow, FIFO, folder, hard link)",
        1,
        tally(daemon, list(expected)),
        "right error_code each",
    )


def test_a_file_replaced_while_queued_is_read_as_its_final_bytes(daemon_factory, request) -> None:
    daemon = daemon_factory(watch={"settle_s": 1.0}).start()
    make_image(daemon.inbox / "swap.png", 50, 10)
    replacement = make_image(daemon.root / "replacement.png", 51, 10)
    os.replace(replacement, daemon.inbox / "swap.png")  # within the settle time
    result = daemon.wait_json("swap.png")
    assert result["text"] == "echo 51x10"
    assert audit(daemon, ["swap.png"]) == (0, 0)
    record(request, "file replaced while queued", 1, tally(daemon, ["swap.png"]), "final bytes OCR'd, once")


def test_five_thousand_files_at_once(daemon_factory, request) -> None:
    daemon = daemon_factory(output={"text_file": "none"})
    source = make_image(daemon.root / "one.png", 20, 10)
    names = [f"burst{i:04}.png" for i in range(5000)]
    daemon.start()
    for name in names:
        shutil.copy(source, daemon.inbox / name)
    wait_until(lambda: len(daemon.results()) == len(names), 600, "5,000 results")
    lost, duplicated = audit(daemon, names)
    assert (lost, duplicated) == (0, 0) and daemon.alive()
    record(request, "5,000 files at once", 1, (len(names), lost, duplicated), "all processed once")


def test_sparse_giant_and_deep_folder_bound_for_another_filesystem(daemon_factory, request, small_tmpfs) -> None:
    """A 40 GiB sparse file (4 KB of data) and a folder named like a scan 1,100 levels deep, with
    failed/ on another filesystem: the file is copied as a sparse file by the publisher thread
    (free space checked first), the folder is kept in the work area's rejected/ (one rename, no
    copy); neither stalls the loop nor fills the disk, and the next scan flows."""
    daemon = daemon_factory(ocr={"engine": "tests.engines:Echo", "max_file_mb": 1}, watch={"mode": "polling"})
    failed = small_tmpfs(daemon.failed, "4m")
    daemon.start()
    with open(daemon.inbox / "giant.tif", "wb") as f:
        f.write(b"II*\x00")
        f.seek(40 << 30)
        f.write(b"end")
    deep = daemon.root / "staging" / "deep.jpg"
    with safefs.folder(daemon.root, ["staging", "deep.jpg", *["d"] * 1100], create=True):
        pass
    os.rename(deep, daemon.inbox / "deep.jpg")
    assert daemon.wait_json("giant.tif", failed, timeout=60)["error_code"] == "too_large"
    moved = failed / "giant.tif"
    assert moved.stat().st_size == (40 << 30) + 3 and moved.stat().st_blocks * 512 < 1 << 20
    document = daemon.wait_json("deep.jpg", failed, timeout=60)
    assert document["error_code"] == "not_regular_file"
    assert "/.watcherd/rejected/deep.jpg" in document["image_path"]
    make_image(daemon.inbox / "next.png")
    assert daemon.wait_json("next.png")["status"] == "ok" and daemon.alive()
    assert not [p for p in failed.iterdir() if p.name.startswith(".")]  # no partial copy left
    # The folder's "original" stays in the work area's rejected/, where audit() does not look.
    files, lost, duplicated = tally(daemon, ["giant.tif", "next.png"])
    deep_kept = (daemon.inbox / ".watcherd" / "rejected" / "deep.jpg").is_dir()
    counts = (files + 1, lost + (not deep_kept), duplicated + len(list(failed.glob("deep_*.jpg.json"))))
    with safefs.folder(daemon.inbox / ".watcherd", ["rejected"]) as fd:
        safefs.remove(fd, "deep.jpg")  # pytest's own clean-up (shutil.rmtree) recurses: too deep for it
    record(
        request,
        "40 GiB sparse file and 1,100-level folder, failed/ on another filesystem",
        1,
        counts,
        "sparse copy off the loop; folder kept in rejected/",
    )


def test_daemon_kill_9_between_outputs_leaves_every_output_exactly_once(daemon_factory, request) -> None:
    """With every format on (JSON, md, txt and the PDF/hOCR/ALTO the child writes to the state
    folder), kill -9 at random moments, publication included: after the restart each file has
    each output exactly once, and no scratch file is left behind."""
    seed = int(os.environ.get("CHAOS_SEED", time.time()))
    rng = random.Random(seed)
    formats = ["json", "md", "txt", "pdf", "hocr", "alto"]
    daemon = daemon_factory(
        ocr={"engine": "tests.engines:Lines"}, watch={"settle_s": 0.05}, output={"formats": formats}
    )
    names: list[str] = []
    iterations = max(5, ITERATIONS // 5)
    for i in range(iterations):
        for j in range(6):
            name = f"f{i:03}_{j:02}.png"
            make_image(daemon.inbox / name, 30 + j, 20)
            names.append(name)
        daemon.start(wait_ready=True)
        time.sleep(rng.uniform(0, 0.6))  # the random moment of the kill is the point of this test
        child_pids = daemon.child_pids()
        daemon.stop(signal.SIGKILL)
        wait_until(lambda: all(gone_or_zombie(p) for p in child_pids), 10, "children to die with the daemon")
    daemon.start()
    wait_all(daemon, names, timeout=120)
    wait_until(lambda: not list((daemon.inbox / ".watcherd" / "pending").iterdir()), 30, "publications to end")
    lost, duplicated = audit(daemon, names)
    for name in names:
        stem, _, ext = name.rpartition(".")
        for fmt in formats[1:]:
            fmt = "alto.xml" if fmt == "alto" else fmt
            found = list(daemon.outbox.glob(f"{name}.{fmt}")) + list(daemon.outbox.glob(f"{stem}_*.{ext}.{fmt}"))
            lost += not found
            duplicated += max(0, len(found) - 1)
    leftovers = list(daemon.state.glob("*.render/*"))
    record(
        request,
        f"daemon kill -9 with every output format on (seed {seed})",
        iterations,
        (len(names), lost, duplicated),
        f"each of {len(formats)} outputs exactly once; {len(leftovers)} scratch files left",
    )
    assert (lost, duplicated) == (0, 0), f"seed {seed}"
    assert leftovers == [], leftovers
