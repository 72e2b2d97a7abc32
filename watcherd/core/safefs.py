"""File operations below folders that other people can write, without following their links.

Threat model (design §9): whoever can write to the inbox (share users, scanners, a synced folder)
can create, rename and replace any name in it at any moment, including swapping a folder for a
symbolic link between our check and our use. So below a trusted root (a folder the operator
configured) nothing is done by joining strings and calling `os.rename(path)`: every folder is
opened one component at a time relative to its parent's descriptor with `O_NOFOLLOW`, and every
rename, link, unlink and open happens relative to such a descriptor, the way Samba and OpenSSH's
sftp-server treat a share. A link where a folder was expected is refused (`Refused`), never
followed; the final component of a rename, link or unlink is never followed by the kernel anyway.

The roots themselves (`paths.*` in the configuration) and the folders above them are the
operator's: they are opened by path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
RENAME_NOREPLACE = 1
NAME_MAX = 255
COPY_CHUNK = 8 << 20


class Refused(OSError):
    """A path below a root is not what it must be (a link, or not a folder): not followed."""


def parts(rel: str) -> list[str]:
    """The components of a relative path with '/' separators; refuses '', '.', '..' and NUL."""
    items = rel.split("/")
    for item in items:
        if item in ("", ".", "..") or "\0" in item or len(os.fsencode(item)) > NAME_MAX:
            raise Refused(errno.EINVAL, "not a plain relative path", rel)
    return items


def open_root(path: Path | str) -> int:
    """A descriptor for a trusted root folder (configured by the operator)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_dir(root_fd: int, components: list[str] | tuple[str, ...], *, create: bool = False, mode: int = 0o750) -> int:
    """Open the folder `components` below `root_fd`, one component at a time, never following a
    link; with `create`, missing folders are made with `mode`. Raises `Refused` for a link or a
    non-folder on the way, FileNotFoundError for a missing one."""
    fd = os.dup(root_fd)
    try:
        for name in components:
            try:
                nxt = os.open(name, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):  # made by someone else meanwhile: checked below
                    os.mkdir(name, mode, dir_fd=fd)
                nxt = _open_subdir(fd, name)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise Refused(errno.ELOOP, "a link or file where a folder was expected", name) from None
                raise
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_subdir(fd: int, name: str) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Refused(errno.ELOOP, "a link or file where a folder was expected", name) from None
        raise


@contextlib.contextmanager
def folder(root: Path | str | int, components: list[str] | tuple[str, ...], **kwargs: int | bool) -> Iterator[int]:
    """`open_dir` as a context manager; `root` is a trusted path or an open descriptor."""
    root_fd = open_root(root) if not isinstance(root, int) else root
    try:
        fd = open_dir(root_fd, components, **kwargs)  # type: ignore[arg-type]
    finally:
        if not isinstance(root, int):
            os.close(root_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def exists_at(dir_fd: int, name: str) -> bool:
    return lstat_at(dir_fd, name) is not None


# -- rename without replacing ----------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def rename_noreplace(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
    """rename(2) that fails with FileExistsError instead of replacing `dst`, atomically where the
    filesystem supports RENAME_NOREPLACE (ext4, xfs, btrfs, tmpfs), else check-then-rename."""
    if _renameat2 is not None:
        rc = _renameat2(src_fd, os.fsencode(src), dst_fd, os.fsencode(dst), RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), src, None, dst)
    if exists_at(dst_fd, dst):
        raise FileExistsError(errno.EEXIST, "destination exists", dst)
    os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)


# -- new files ------------------------------------------------------------------------------


def _temp_name(name: str) -> str:
    """`.name.<random>.tmp`, cut to fit NAME_MAX in bytes (200 CJK characters are 600 bytes)."""
    return f".{os.fsdecode(os.fsencode(name)[:200])}.{secrets.token_hex(4)}.tmp"


def write_new(dir_fd: int, name: str, data: bytes, *, mode: int) -> None:
    """Publish `data` as `name` in `dir_fd`, whole or not at all, with exactly `mode`.

    Written to a temp file (O_EXCL|O_NOFOLLOW: a planted link at the temp name is never written
    through), fsync'ed, then hard-linked into place, which fails when the name exists, so the
    no-clobber check and the publish are one step. If `name` already holds exactly `data` (a
    publish redone after a crash) this is a no-op; if it holds anything else: FileExistsError.
    """
    tmp = _temp_name(name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, mode)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            if read_regular(dir_fd, name, len(data) + 1) != data:
                raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # Filesystems without hard links (some SMB/FUSE mounts): rename without replacing.
            try:
                rename_noreplace(dir_fd, tmp, dir_fd, name)
            except FileExistsError:
                if read_regular(dir_fd, name, len(data) + 1) != data:
                    raise
        os.fsync(dir_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_regular(dir_fd: int, name: str, limit: int) -> bytes | None:
    """At most `limit` bytes of `name` if it is a regular file (never a link, FIFO or device)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, left = [], limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_private(dir_fd: int, name: str, data: bytes, *, mode: int = 0o600, durable: bool = False) -> None:
    """Replace `name` with `data` atomically (temp + rename); for our own state files. `durable`
    fsyncs the data before the rename and the folder after it (a publication record must survive
    a power cut whole; the status file need not)."""
    tmp = _temp_name(name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        try:
            _write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        if durable:
            os.fsync(dir_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)


# -- moves ----------------------------------------------------------------------------------


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


def remove(dir_fd: int, name: str) -> None:
    """Delete `name` (a file, a link, or a whole folder tree) without following any link; missing
    is fine. Iterative with one descriptor open at a time, so a tree thousands of levels deep
    costs neither recursion nor file descriptors."""
    st = lstat_at(dir_fd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        return
    names = [name]  # the path from dir_fd down to the folder `fd` is open on
    fd = _open_subdir(dir_fd, name)
    try:
        while True:
            sub = None
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        sub = entry.name
                        break
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.name, dir_fd=fd)
            if sub is not None:
                below = _open_subdir(fd, sub)
                os.close(fd)
                fd = below
                names.append(sub)
                continue
            empty = names.pop()
            up = os.open("..", DIR_FLAGS, dir_fd=fd) if names else os.dup(dir_fd)
            os.close(fd)
            fd = up
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(empty, dir_fd=fd)
            if not names:
                return
    finally:
        os.close(fd)


def prune(root_fd: int, components: list[str]) -> None:
    """Remove the empty folders `components` below `root_fd`, deepest first (the processing area
    grows them for nested files)."""
    for depth in range(len(components), 0, -1):
        try:
            with folder(root_fd, components[: depth - 1]) as parent:
                os.rmdir(components[depth - 1], dir_fd=parent)
        except OSError:
            return


def key_file(dir_fd: int, name: str) -> bytes:
    """A 32-byte secret kept as `name` in `dir_fd` (the state folder): created once, owner-only,
    fsync'ed with its folder; never read through a link or from anything but a 32-byte file."""
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        key = read_regular(dir_fd, name, 64)
        if key is None or len(key) != 32:
            raise OSError(f"{name} is not a 32-byte key file") from None
        return key
    key = secrets.token_bytes(32)
    try:
        _write_all(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.fsync(dir_fd)
    return key
