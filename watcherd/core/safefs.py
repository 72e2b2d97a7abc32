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

Trees are walked with `walk` (every reader of a tree below a root uses it, and `remove`), and
whatever is found where only our own things belong is moved out of the way with `set_aside`.
Moving a file to another folder, across filesystems if need be, is `moves.move`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
RENAME_NOREPLACE = 1
NAME_MAX = 255


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
                nxt = _open_subdir(fd, name)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):  # made by someone else meanwhile: checked below
                    os.mkdir(name, mode, dir_fd=fd)
                nxt = _open_subdir(fd, name)
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


def remove(dir_fd: int, name: str) -> None:
    """Delete `name` (a file, a link, or a whole folder tree) without following any link; missing
    is fine. A tree goes in one bottom-up `walk`, so one thousands of levels deep costs neither
    recursion nor a descriptor per level."""
    st = lstat_at(dir_fd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        return
    top = _open_subdir(dir_fd, name)
    try:
        for found in walk(top, bottom_up=True):
            if found.leaving:
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(found.name, dir_fd=found.fd)
                continue
            for entry, is_folder in found.entries.items():
                if not is_folder:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry, dir_fd=found.fd)
    finally:
        os.close(top)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(name, dir_fd=dir_fd)


def prune(root_fd: int, components: list[str]) -> None:
    """Remove the empty folders `components` below `root_fd`, deepest first (the processing area
    grows them for nested files)."""
    for depth in range(len(components), 0, -1):
        try:
            with folder(root_fd, components[: depth - 1]) as parent:
                os.rmdir(components[depth - 1], dir_fd=parent)
        except OSError:
            return


# -- walking a tree -------------------------------------------------------------------------


@dataclass(eq=False)
class Folder:
    """One visit of a `walk`. `fd` is open on the folder until the walk is asked for its next
    visit; `entries` is every name in it, sorted, with whether it is a folder (a link never is, nor
    an entry whose type cannot be read); `descend` is the subfolders entered next, in that order
    (narrow it, or `skip()`); at `at_limit` (`max_depth`) none are. A `leaving` visit (`bottom_up`)
    comes when all below the folder is done: `fd` is then its parent's, ready for an rmdir of
    `name`, and `st` is still the folder's own fstat from when it was entered."""

    name: str  # "" for the root
    parent: Folder | None = field(repr=False)
    fd: int
    st: os.stat_result
    entries: dict[str, bool]
    descend: list[str]
    depth: int
    at_limit: bool
    leaving: bool = False
    come_back: bool = True

    @property
    def path(self) -> tuple[str, ...]:
        """The names from the root down to this folder; () for the root."""
        names, node = [], self
        while node.parent is not None:
            names.append(node.name)
            node = node.parent
        return tuple(reversed(names))

    def skip(self) -> None:
        """Enter nothing below this folder and, walking bottom-up, do not come back to it."""
        self.descend = []
        self.come_back = False


def walk(
    root: Path | str | int,
    *,
    max_depth: int | None = None,
    bottom_up: bool = False,
    on_error: Callable[[tuple[str, ...], OSError], None] | None = None,
) -> Iterator[Folder]:
    """Every folder below `root` (a trusted path, or a descriptor), the root first, depth first in
    name order: iterative, by descriptor, never following a link, one descriptor at a time.

    A folder is entered from its parent's descriptor with O_NOFOLLOW, and the walk climbs back up
    through "..", checked to be the very folder it came down from (device and inode); where it is
    not (a folder on the way was moved meanwhile) the folder is opened again from the root, one
    component at a time. So the walk only stands in folders it entered from the root downwards,
    and a tree thousands of levels deep costs neither recursion, nor a descriptor per level, nor a
    way down from the root per folder. Below `max_depth` levels nothing is entered. A folder that
    cannot be entered or listed (gone, a link now, unreadable) is left out with all below it, and
    `on_error(path, exc)` is told (without `on_error`, the error is raised). `bottom_up` adds a
    `leaving` visit for every folder below the root once all below it is done.
    """
    try:
        place = _Place(os.dup(root) if isinstance(root, int) else open_root(root))
    except OSError as exc:
        _failed(on_error, (), exc)
        return
    todo: list[tuple[Folder | None, str] | Folder] = [(None, "")]
    try:
        while todo:
            item = todo.pop()
            if isinstance(item, Folder):  # all below it is done: stand in its parent
                assert item.parent is not None
                try:
                    item.fd = place.go(item.parent)
                except OSError as exc:
                    _failed(on_error, item.parent.path, exc)
                    continue
                item.leaving = True
                yield item
                continue
            parent, name = item
            try:
                fd = place.root_fd if parent is None else place.enter(parent, name)
                st, entries = os.fstat(fd), _list(fd)
            except OSError as exc:
                _failed(on_error, () if parent is None else (*parent.path, name), exc)
                continue
            depth = 0 if parent is None else parent.depth + 1
            at_limit = max_depth is not None and depth >= max_depth
            visit = Folder(name, parent, fd, st, entries, [n for n, d in entries.items() if d], depth, at_limit)
            place.arrived(visit)
            yield visit
            visit.entries = {}  # not kept while the walk is below it
            if bottom_up and visit.come_back and parent is not None:
                todo.append(visit)
            if not at_limit:
                todo.extend((visit, entry) for entry in reversed(visit.descend))
    finally:
        place.close()


def _failed(on_error: Callable[[tuple[str, ...], OSError], None] | None, path: tuple[str, ...], exc: OSError) -> None:
    if on_error is None:
        raise exc
    on_error(path, exc)


def _list(fd: int) -> dict[str, bool]:
    with os.scandir(fd) as it:
        found = [(entry.name, _is_folder(entry)) for entry in it]
    return dict(sorted(found))


def _is_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False  # its type cannot be read: not entered


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class _Place:
    """Where a walk stands: one descriptor, `fd`, on the last of `chain`, the folders from the root
    down to it (None: entered, not yet `arrived`) with their identities as they were entered."""

    def __init__(self, root_fd: int):
        self.root_fd = self.fd = root_fd
        self.chain: list[tuple[Folder | None, tuple[int, int]]] = [(None, _identity(root_fd))]

    def enter(self, parent: Folder, name: str) -> int:
        self.go(parent)
        self._set(_open_subdir(self.fd, name))
        self.chain.append((None, _identity(self.fd)))
        return self.fd

    def arrived(self, folder: Folder) -> None:
        self.chain[-1] = (folder, self.chain[-1][1])

    def go(self, folder: Folder) -> int:
        """Stand in `folder`: climb to it when it is above where we stand, else come down from the
        root (also when a climb does not find the folder expected: a folder on the way moved)."""
        while self.chain[-1][0] is not folder and len(self.chain) > 1 and self._up():
            pass
        if self.chain[-1][0] is not folder:
            self._set(self.root_fd)
            del self.chain[1:]
            lineage, node = [], folder
            while node.parent is not None:
                lineage.append(node)
                node = node.parent
            for node in reversed(lineage):
                self._set(_open_subdir(self.fd, node.name))
                self.chain.append((node, _identity(self.fd)))
        return self.fd

    def _up(self) -> bool:
        up = self.root_fd if len(self.chain) == 2 else os.open("..", DIR_FLAGS, dir_fd=self.fd)
        if up != self.root_fd and _identity(up) != self.chain[-2][1]:
            os.close(up)  # the folder we stand in was moved: ".." is not the one we came down from
            return False
        self._set(up)
        self.chain.pop()
        return True

    def _set(self, fd: int) -> None:
        if self.fd not in (fd, self.root_fd):
            os.close(self.fd)
        self.fd = fd

    def close(self) -> None:
        self._set(self.root_fd)
        os.close(self.root_fd)


# -- setting aside --------------------------------------------------------------------------


def aside_stamp() -> str:
    """The second something is set aside, and 6 random hex digits: never the same name twice."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


def set_aside(
    dir_fd: int, name: str, *, label: str, into: int | None = None, shown: str | None = None, stamp: str | None = None
) -> str:
    """Move `name` (a file, a link, a folder tree: anything) out of the way, never replacing
    anything, and return its new name; it is kept for the operator to look at, never used.

    In place (`into` None): renamed to `<name>.<label>-<stamp>`, beside where it lay (something in
    the place of a folder or file of ours). Into the folder `into`: moved there as
    `<label>-<stamp>-<shown>`, or `<stamp>-<shown>` without a label (a queue entry we did not
    write); `shown` is the name cut as the caller needs it to fit (default: `name`). A `stamp`
    from `aside_stamp()` shared by several calls keeps their names together.
    """
    stamp = stamp or aside_stamp()
    if into is None:
        new = f"{name}.{label}-{stamp}"
    else:
        new = f"{label}-{stamp}-{shown or name}" if label else f"{stamp}-{shown or name}"
    rename_noreplace(dir_fd, name, dir_fd if into is None else into, new)
    return new
