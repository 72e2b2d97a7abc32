"""Frames between the parent and the OCR child, and the parent's reader of them.

Frames are multiprocessing's (`Connection.send_bytes`: a 4-byte big-endian length, or -1 and an
8-byte length, then the bytes), so the child writes with a plain `Connection`. The parent does
not read with one: `recv_bytes()` blocks until the whole frame is there, so a child that wrote a
header claiming 60 MB and then hung would stall the main loop, timeout clock included. `Reader`
reads what the pipe holds without blocking and returns complete frames, up to
`MAX_MESSAGE_BYTES` each.
"""

from __future__ import annotations

import os
import struct

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a page's text is kilobytes; a bug or an attack is not
READ_CHUNK = 1024 * 1024
READ_PER_CALL = 8 * 1024 * 1024  # then back to the loop; the pipe stays readable, so we come back


class ProtocolError(Exception):
    """The child sent something that is not a message we know: treat it as a crash."""


class Reader:
    """Complete frames from a non-blocking pipe, without ever waiting for the rest of one."""

    def __init__(self, fd: int):
        os.set_blocking(fd, False)
        self.fd = fd
        self.buffer = bytearray()
        self.closed = False

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def read(self) -> tuple[list[bytes], bool]:
        """(complete frames, end of file). Raises ProtocolError on an oversized frame."""
        eof = False
        taken = 0
        while taken < READ_PER_CALL:
            try:
                chunk = os.read(self.fd, READ_CHUNK)
            except BlockingIOError:
                break
            except OSError:
                eof = True
                break
            if not chunk:
                eof = True
                break
            self.buffer += chunk
            taken += len(chunk)
        return self._frames(), eof

    def _frames(self) -> list[bytes]:
        frames: list[bytes] = []
        while True:
            if len(self.buffer) < 4:
                return frames
            (size,) = struct.unpack("!i", self.buffer[:4])
            start = 4
            if size == -1:
                if len(self.buffer) < 12:
                    return frames
                (size,) = struct.unpack("!Q", self.buffer[4:12])
                start = 12
            if size < 0 or size > MAX_MESSAGE_BYTES:
                raise ProtocolError(f"a message of {size:,} bytes, over the {MAX_MESSAGE_BYTES:,}-byte cap")
            if len(self.buffer) < start + size:
                return frames
            frames.append(bytes(self.buffer[start : start + size]))
            del self.buffer[: start + size]
