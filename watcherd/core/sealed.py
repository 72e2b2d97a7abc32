"""Files the daemon writes for itself and must not trust when it reads them back: publication
records (`spool`) and hand-off queue entries (`handoff`). Each is a JSON body sealed with an
HMAC-SHA256 under a key kept in the state folder (`safefs.key_file`) and a purpose string, so a
record cannot pass for a queue entry, nor a planted or altered file for either.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from typing import Any

from watcherd.core import safefs


class NotOurs(ValueError):
    """Not a file this daemon sealed (or sealed and then altered); `str()` says why."""


def seal(body: str, *, key: bytes, purpose: str) -> bytes:
    """The file's bytes for `body` (JSON text, ASCII or surrogate-escaped)."""
    return json.dumps({"body": body, "mac": _mac(body, key=key, purpose=purpose)}).encode()


def unseal(dir_fd: int, name: str, st: os.stat_result, *, key: bytes, purpose: str, limit: int) -> Any:
    """The parsed body of `name` (lstat `st`) in `dir_fd`: a regular file of at most `limit` bytes,
    never read through a link, whose MAC matches. NotOurs otherwise."""
    if not stat.S_ISREG(st.st_mode):
        raise NotOurs("not a regular file")
    if st.st_size > limit:
        raise NotOurs(f"{st.st_size} bytes, too large")
    data = safefs.read_regular(dir_fd, name, limit)
    if data is None:
        raise NotOurs("cannot be read as a regular file")
    try:
        envelope = json.loads(data)
        body, mac = envelope["body"], envelope["mac"]
        if not isinstance(body, str) or not isinstance(mac, str):
            raise TypeError
    except (ValueError, TypeError, KeyError):
        raise NotOurs("not a sealed envelope") from None
    if not hmac.compare_digest(mac, _mac(body, key=key, purpose=purpose)):
        raise NotOurs("its MAC does not match: forged or altered")
    try:
        return json.loads(body)
    except ValueError:
        raise NotOurs("its body is not JSON") from None


def _mac(body: str, *, key: bytes, purpose: str) -> str:
    data = purpose.encode() + b"\0" + body.encode("utf-8", "surrogatepass")
    return hmac.new(key, data, hashlib.sha256).hexdigest()
