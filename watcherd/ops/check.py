"""`watcherd check`, and the folder checks `watcherd run` must pass before it claims anything:
configuration, folder permissions (probed with real files, naming the folder and the permission
that is missing, because on shares the mode bits lie), the inbox's filesystem and watch mode with
the reason, inotify limits against the size of the tree, whether the engine imports, and each
GPU's free memory against the guards (read in a throw-away process: the parent never imports
torch).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from watcherd.core.settings import Settings
from watcherd.intake import mounts
from watcherd.ocr import launch


def report(settings: Settings) -> int:
    """Print one line per check (`ok` / `FAIL` / `note`); 1 if any check failed, else 0.

    Covers design §4: configuration, folder permissions (naming the folder and the permission that
    is missing), the inbox's filesystem and the watch mode chosen for it with the reason, inotify
    limits against the size of the tree, and whether the engine imports.
    """
    print(f"ok    config        {settings.source}")
    failures = 0

    def report(ok: bool | None, what: str, detail: str) -> None:
        nonlocal failures
        failures += ok is False
        print(f"{'ok  ' if ok else 'note' if ok is None else 'FAIL'}  {what:<13} {detail}")

    inbox = settings.paths.inbox
    assert inbox is not None
    for check in folders(settings):
        report(check.ok, check.key, check.detail)
    if inbox.is_dir():
        for ok, what, detail in watch(settings):
            report(ok, what, detail)
    report(*engine(settings))
    for ok, what, detail in gpu(settings):
        report(ok, what, detail)
    return 0 if failures == 0 else 1


GPU_PROBE = """
import json, sys
try:
    import torch
except ImportError as exc:
    print(json.dumps({"error": f"torch is not importable: {exc}"})); sys.exit()
from watcherd.ocr import gpu
print(json.dumps(gpu.info() if torch.cuda.is_available() else {"available": False}))
"""


def gpu(settings: Settings) -> list[tuple[bool | None, str, str]]:
    """Each configured GPU, its free memory now, and whether the guards would let a page run.

    Read in a throw-away process started as the child is (`launch`: under `ocr.python`, in "/",
    with CUDA_VISIBLE_DEVICES set as the child will have it): the parent never imports torch.
    """
    if settings.ocr.devices is None and settings.ocr.engine == "rapidocr":
        return [(True, "gpu", "not used (rapidocr runs on the CPU)")]
    python = settings.ocr.python or sys.executable
    g = settings.gpu
    lines: list[tuple[bool | None, str, str]] = []
    argv = launch.command(settings.ocr, f"{launch.CHILD_PATH_SETUP}\n{GPU_PROBE}")
    for device in settings.ocr.devices or (None,):
        name = "gpu" if device is None else f"gpu {device}"
        try:
            out = launch.run(argv, timeout=120, env=launch.environment(device=device))
            info = json.loads(out.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
            lines.append((False, name, f"cannot read GPU memory under {python}: {exc}"))
            continue
        if "error" in info:
            lines.append((None if device is None else False, name, info["error"]))
        elif not info.get("available"):
            lines.append(
                (None if device is None else False, name, "no CUDA device visible: the engine runs on the CPU")
            )
        else:
            passes = info["free_mb"] >= g.min_free_mb and info["usage_percent"] <= g.max_usage_percent
            lines.append(
                (
                    passes,
                    name,
                    f"{info['device']}: {info['free_mb']:,} MB free of {info['total_mb']:,} MB "
                    f"({info['usage_percent']}% used); guards (≥ {g.min_free_mb} MB free, ≤ "
                    f"{g.max_usage_percent:g}% used) {'pass' if passes else 'would defer files'} now",
                )
            )
    return lines


def folders(settings: Settings) -> list[Check]:
    """The permission checks `watcherd run` needs to pass before it can work."""
    inbox = settings.paths.inbox
    assert inbox is not None
    checks = check_inbox(inbox)
    for key in ("outbox", "failed", "archive", "state"):
        folder = getattr(settings.paths, key)
        if folder is not None:
            checks.append(check_output(folder, f"paths.{key}"))
    return checks


def watch(settings: Settings) -> list[tuple[bool | None, str, str]]:
    """Filesystem, watch mode and why, and inotify limits against the number of folders."""
    inbox = settings.paths.inbox
    assert inbox is not None
    watch = settings.watch
    plan = mounts.choose_watch_mode(inbox, watch.mode, recursive=watch.recursive)
    lines: list[tuple[bool | None, str, str]] = [
        (True, "filesystem", f"{inbox} is on {plan.fstype}"),
        (True, "watch", f"{plan.mode}: {plan.reason}"),
    ]
    if plan.mode == "polling" or plan.poll_also:
        lines.append(
            (
                True,
                "watch.poll",
                f"every {watch.poll_interval_s:g} s: one stat per folder, a listing "
                f"only for folders that changed; full rescan every {watch.rescan_interval_s:g} s",
            )
        )
    limits = mounts.inotify_limits()
    folders = 1 + mounts.count_folders(inbox) if watch.recursive else 1
    detail = (
        f"max_user_watches {limits['max_user_watches']}, max_user_instances {limits['max_user_instances']}, "
        f"max_queued_events {limits['max_queued_events']}; the inbox tree has {folders} folder(s)"
    )
    ok: bool | None = True
    if plan.mode == "events":
        watches = limits["max_user_watches"]
        if watches is not None and folders > watches // 2:
            ok = None  # not fatal: the daemon falls back to polling, but say so now
            detail += (
                f"; WARNING: one watch per folder would use more than half of max_user_watches "
                f"(raise it: sysctl fs.inotify.max_user_watches={max(524288, folders * 4)})"
            )
    lines.append((ok, "inotify", detail))
    return lines


def engine(settings: Settings) -> tuple[bool, str, str]:
    python = settings.ocr.python or sys.executable
    problem = launch.probe_engine(settings.ocr)
    if problem is not None:
        return False, "ocr.engine", problem
    return True, "ocr.engine", f"{settings.ocr.engine} imports under {python}"


@dataclass(frozen=True)
class Check:
    ok: bool
    key: str  # the configuration key it is about (paths.inbox, ...)
    detail: str  # names the folder and, on failure, the permission that is missing


def _who() -> str:
    return f"uid {os.geteuid()}, gid {os.getegid()}"


def _describe(folder: Path) -> str:
    try:
        st = os.stat(folder)
    except OSError:
        return ""
    return f" (mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid} gid {st.st_gid}; watcherd runs as {_who()})"


def _errno_words(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return "the filesystem is mounted read-only"
    return exc.strerror or str(exc)


def check_inbox(inbox: Path) -> list[Check]:
    """Can the daemon list the inbox, and create, rename (claim) and delete files in it?

    Probes with a real file, because on shares the mode bits lie (ACLs, root_squash, Samba
    `force user`, read-only exports): what counts is whether rename(2) works. The work area is not
    touched here: `work.area.WorkArea` opens it, and sets aside whatever share users put in its place.
    """
    key = "paths.inbox"
    if not inbox.is_dir():
        return [Check(False, key, f"{inbox}: not an existing folder")]
    checks = []
    try:
        with os.scandir(inbox) as entries:
            next(entries, None)
    except OSError as exc:
        return [
            Check(
                False,
                key,
                f"{inbox}: cannot list files: missing read permission on the folder "
                f"({_errno_words(exc)}){_describe(inbox)}",
            )
        ]
    probe = ""
    try:
        fd, probe = tempfile.mkstemp(dir=inbox, prefix=".watcherd-check-")
        os.close(fd)
    except OSError as exc:
        return [
            Check(
                False,
                key,
                f"{inbox}: cannot create, rename or delete files: missing write permission "
                f"on the folder ({_errno_words(exc)}){_describe(inbox)}",
            )
        ]
    try:
        moved = f"{probe}.claimed"
        try:
            os.rename(probe, moved)  # what claiming does
            probe = moved
        except OSError as exc:
            checks.append(Check(False, key, f"{inbox}: cannot rename files (claiming a file): {_errno_words(exc)}"))
            return checks
        try:
            os.unlink(probe)  # what on_success: delete does
            probe = ""
        except OSError as exc:
            checks.append(Check(False, key, f"{inbox}: cannot delete files: {_errno_words(exc)}"))
            return checks
    finally:
        if probe and os.path.lexists(probe):
            try:
                os.unlink(probe)
            except OSError:
                pass
    st = os.stat(inbox)
    note = ""
    if st.st_mode & stat.S_ISVTX and os.geteuid() != 0:
        # The sticky bit (common on shared drop folders) lets only a file's owner rename it: files
        # uploaded by another account would fail at claim time although this probe passed.
        note = f"; WARNING: the sticky bit is set, so only files owned by uid {os.geteuid()} can be claimed"
    checks.append(Check(True, key, f"{inbox} (list, create, rename, delete: allowed){note}"))
    return checks


def check_output(folder: Path, key: str) -> Check:
    """Can the daemon create `folder` (if missing) and create, rename and delete files in it?"""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return Check(False, key, f"{folder}: {existing} is not a folder")
    if existing != folder:
        if not os.access(existing, os.W_OK | os.X_OK):
            return Check(
                False, key, f"{folder}: cannot be created: missing write permission on {existing}{_describe(existing)}"
            )
        return Check(True, key, f"{folder} (will be created in {existing})")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".watcherd-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return Check(
            False,
            key,
            f"{folder}: cannot write files: missing write permission on the folder "
            f"({_errno_words(exc)}){_describe(folder)}",
        )
    return Check(True, key, f"{folder} (write: allowed)")
