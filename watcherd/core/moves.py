"""Moving a file into another folder without replacing anything, across filesystems if need be,
so that a crash at any instant leaves it in one place or the other, or in both with the same
content (and a repeat of the move finishes the job): never in neither, never half-copied.

Both folders are given as descriptors opened with `safefs` (design §9); nothing is followed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from watcherd.core.safefs import exists_at, lstat_at, rename_noreplace

COPY_CHUNK = 8 << 20


def move(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
    """Move `src` to `dst` without replacing anything; safe to repeat after a crash.

    Same filesystem: one rename(2), never replacing. Across filesystems (EXDEV) only regular files
    are copied: to a temp file beside `dst` (holes stay holes, free space checked first), fsync,
    linked into place, then `src` is unlinked. Anything else across filesystems raises
    `CrossDevice` for the caller to keep it where it is.
    """
    st = lstat_at(src_fd, src)
    if st is None:
        if exists_at(dst_fd, dst):
            return  # done before a crash; this is the repeat
        raise FileNotFoundError(errno.ENOENT, "no such file", src)
    try:
        rename_noreplace(src_fd, src, dst_fd, dst)
    except FileExistsError:
        if stat.S_ISREG(st.st_mode) and _same_file_content(src_fd, src, dst_fd, dst):
            os.unlink(src, dir_fd=src_fd)  # a cross-filesystem move that crashed after the copy
            os.fsync(src_fd)
            return
        raise
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        if not stat.S_ISREG(st.st_mode):
            raise CrossDevice(errno.EXDEV, "only regular files are copied across filesystems", src) from None
        _copy_across(src_fd, src, dst_fd, dst)
        os.unlink(src, dir_fd=src_fd)
    os.fsync(dst_fd)
    os.fsync(src_fd)


class CrossDevice(OSError):
    """A folder, link or special file cannot be moved to another filesystem with one rename."""


def _copy_across(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
    fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=src_fd)
    try:
        st = os.fstat(fd_in)
        if not stat.S_ISREG(st.st_mode):
            raise CrossDevice(errno.EXDEV, "not a regular file", src)
        need = st.st_blocks * 512
        vfs = os.fstatvfs(dst_fd)
        if need > vfs.f_bavail * vfs.f_frsize:
            raise OSError(errno.ENOSPC, f"{need} bytes needed, {vfs.f_bavail * vfs.f_frsize} free", dst)
        # A fixed temp name: a copy cut short by kill -9 is found and started over by the redo.
        tmp = f".{os.fsdecode(os.fsencode(dst)[:200])}.watcherd-copy"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dst_fd)
        fd_out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dst_fd)
        try:
            try:
                os.fchmod(fd_out, stat.S_IMODE(st.st_mode))
                copy_data(fd_in, fd_out, st.st_size)
                os.fsync(fd_out)
            finally:
                os.close(fd_out)
            try:
                os.link(tmp, dst, src_dir_fd=dst_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                rename_noreplace(dst_fd, tmp, dst_fd, dst)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dst_fd)  # never leaves a partial copy behind
        os.fsync(dst_fd)
    finally:
        os.close(fd_in)


def copy_data(fd_in: int, fd_out: int, size: int) -> None:
    """Copy the data regions of `fd_in` (SEEK_DATA/SEEK_HOLE): a 40 GiB sparse file with 4 KB of
    data costs 4 KB of reads and writes, not 40 GiB."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd_in, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # only a hole is left
            if exc.errno != errno.EINVAL:
                raise
            start = pos  # no SEEK_DATA here: copy everything
        try:
            end = os.lseek(fd_in, start, os.SEEK_HOLE)
        except OSError:
            end = size
        while start < end:
            chunk = os.pread(fd_in, min(COPY_CHUNK, end - start), start)
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                written = os.pwrite(fd_out, view, start)
                view, start = view[written:], start + written
        pos = end
    os.ftruncate(fd_out, size)


def _same_file_content(a_fd: int, a: str, b_fd: int, b: str) -> bool:
    sa, sb = lstat_at(a_fd, a), lstat_at(b_fd, b)
    if sa is None or sb is None or not (stat.S_ISREG(sa.st_mode) and stat.S_ISREG(sb.st_mode)):
        return False
    if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino) or sa.st_size != sb.st_size:
        return False
    fa = os.open(a, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=a_fd)
    try:
        fb = os.open(b, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=b_fd)
        try:
            while True:
                ca, cb = os.read(fa, 1 << 20), os.read(fb, 1 << 20)
                if ca != cb:
                    return False
                if not ca:
                    return True
        finally:
            os.close(fb)
    finally:
        os.close(fa)
