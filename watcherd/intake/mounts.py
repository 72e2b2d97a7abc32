"""The ground under the folders: which filesystem each lives on, how to watch it, what we may do there.

- `filesystem_type` / `mounts_below` read /proc/self/mountinfo.
- `choose_watch_mode` turns `watch.mode: auto` into events or polling, with the reason in words.
  inotify only reports changes made through this kernel: a file written by another NFS client,
  by a Windows PC into the Samba server's disk *when we are the SMB client*, or by the daemon
  behind a FUSE mount produces no event at all, so those filesystems are polled.
- `inotify_limits` reads the per-user limits that make inotify fail (ENOSPC, EMFILE).
- `count_folders` / `inotify_watch_count` compare the tree with the watches it needs.
The permission probes are `check.py`'s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from watcherd.core import safefs

# Filesystems whose content can change without this kernel seeing it (so without inotify events).
# `fuse` and every `fuse.*` subtype are treated the same way: sshfs, rclone, s3fs, bindfs, gvfs
# and the NTFS drivers all look alike from here, and polling a local FUSE mount costs little.
NETWORK_TYPES = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "davfs",
        "afs", "coda", "ncpfs", "ocfs2", "gfs2", "gpfs", "beegfs", "orangefs", "pvfs2", "virtiofs",
        "vboxsf", "vmhgfs", "fuse", "fuseblk",
    }
)  # fmt: skip


def is_network(fstype: str) -> bool:
    """True for filesystems inotify cannot be trusted on (network, cluster, FUSE, VM shares)."""
    return fstype in NETWORK_TYPES or fstype.startswith("fuse.")


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    source: str


def read_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[Mount]:
    """Every mount of this process's namespace; [] if mountinfo cannot be read."""
    try:
        lines = Path(mountinfo).read_text(errors="surrogateescape").splitlines()
    except OSError:
        return []
    mounts = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or not tail:
            continue
        mounts.append(Mount(_unescape(fields[4]), tail[0], _unescape(tail[1]) if len(tail) > 1 else ""))
    return mounts


def _unescape(field: str) -> str:
    r"""mountinfo writes space, tab, newline and backslash as octal escapes (\040 ...)."""
    if "\\" not in field:
        return field
    raw = os.fsencode(field)
    out, i = bytearray(), 0
    while i < len(raw):
        if raw[i : i + 1] == b"\\" and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def _inside(target: str, point: str) -> bool:
    return target == point or target.startswith(point.rstrip("/") + "/")


def filesystem_type(path: Path, mountinfo: str = "/proc/self/mountinfo") -> str:
    """The type of the mount holding `path` (ext4, nfs4, cifs, fuse.bindfs, ...), or '?'."""
    target = os.path.realpath(path)
    best, best_type = "", "?"
    for mount in read_mounts(mountinfo):  # the last, longest match wins: later mounts hide earlier
        if _inside(target, mount.point) and len(mount.point) >= len(best):
            best, best_type = mount.point, mount.fstype
    return best_type


def mounts_below(path: Path, mountinfo: str = "/proc/self/mountinfo") -> list[Mount]:
    """Mounts strictly inside `path` (a NAS share mounted at inbox/scanner1, say), outermost first."""
    target = os.path.realpath(path)
    found: dict[str, Mount] = {}
    for mount in read_mounts(mountinfo):
        if mount.point != target and _inside(mount.point, target):
            found[mount.point] = mount  # a later mount on the same point hides the earlier one
    return sorted(found.values(), key=lambda m: (m.point.count("/"), m.point))


@dataclass(frozen=True)
class WatchPlan:
    """How to watch an inbox: `mode` for the inbox itself, plus folders below it to poll anyway."""

    mode: str  # "events" | "polling"
    reason: str
    fstype: str
    poll_also: tuple[Path, ...] = ()


def choose_watch_mode(
    inbox: Path, requested: str, *, recursive: bool = True, mountinfo: str = "/proc/self/mountinfo"
) -> WatchPlan:
    """Decide events or polling for `inbox` (design §3 `watch.mode`), and say why."""
    fstype = filesystem_type(inbox, mountinfo)
    if requested in ("events", "polling"):
        return WatchPlan(requested, f"watch.mode: {requested} (inbox filesystem: {fstype})", fstype)
    if fstype == "?":
        return WatchPlan(
            "polling",
            "watch.mode: auto, and the inbox's filesystem type is unknown "
            "(/proc/self/mountinfo unreadable): polling is never blind",
            fstype,
        )
    if is_network(fstype):
        return WatchPlan(
            "polling",
            f"watch.mode: auto, and the inbox is on {fstype}: changes made by other "
            "hosts or by the filesystem daemon produce no inotify events",
            fstype,
        )
    remote = [m for m in mounts_below(inbox, mountinfo) if is_network(m.fstype)] if recursive else []
    reason = f"watch.mode: auto, and the inbox is on {fstype} (local: inotify sees every change)"
    if remote:
        listed = ", ".join(f"{m.point} ({m.fstype})" for m in remote)
        reason += f"; polling the network mount(s) below it: {listed}"
    return WatchPlan("events", reason, fstype, tuple(Path(m.point) for m in remote))


# -- inotify limits --------------------------------------------------------------------------

INOTIFY_SYSCTL = Path("/proc/sys/fs/inotify")


def inotify_limits(root: Path = INOTIFY_SYSCTL) -> dict[str, int | None]:
    """max_user_watches, max_user_instances, max_queued_events (None where unreadable)."""
    limits: dict[str, int | None] = {}
    for name in ("max_user_watches", "max_user_instances", "max_queued_events"):
        try:
            limits[name] = int((root / name).read_text())
        except (OSError, ValueError):
            limits[name] = None
    return limits


def count_folders(top: Path, limit: int | None = None) -> int:
    """Folders below `top` (not counting `top`), never following symlinks; stops at `limit`.

    A `safefs.walk`: Python 3.11's `os.walk` recursed once per level, so a tree 1,100 folders deep
    (any share user can make one) raised RecursionError and watcherd exited at every start.
    `limit` bounds the work on huge trees when only "more than N?" matters. A folder that vanished
    or cannot be listed is counted, not walked: it could not be watched either.
    """
    count = 0
    for folder in safefs.walk(top, on_error=lambda path, exc: None):
        count += len(folder.descend)
        if limit is not None and count >= limit:
            break
    return count if limit is None else min(count, limit)


def inotify_watch_count(pid: int | str = "self") -> int | None:
    """Watches held by this process's inotify instances, from /proc/<pid>/fdinfo; None if none.

    watchdog swallows ENOSPC for every folder but the top one, so comparing this with the number
    of folders is the only way to learn that `max_user_watches` left part of the tree unwatched.
    """
    total, found = 0, False
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink(fd_dir / fd) != "anon_inode:inotify":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        found = True
        total += sum(1 for line in info.splitlines() if line.startswith("inotify wd:"))
    return total if found else None
