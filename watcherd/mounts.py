"""Which filesystem a folder lives on, from /proc/self/mountinfo."""

from __future__ import annotations

import os
from pathlib import Path


def filesystem_type(path: Path, mountinfo: str = "/proc/self/mountinfo") -> str:
    """The type of the mount holding `path` (ext4, nfs4, cifs, fuse.bindfs, ...), or '?'."""
    target = os.path.realpath(path)
    best, best_type = "", "?"
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return "?"
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount_point = fields[4].encode().decode("unicode_escape")  # \040 for spaces
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, right.split()[0]
    return best_type
