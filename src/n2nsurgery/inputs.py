"""Opening the files a user names: one clear message for each way it can fail.

Every input goes through :func:`open_input`, so the special files a path can name (a FIFO, a
character device such as ``/dev/zero``, a symlink to one) are handled in one place:

* a FIFO is opened without blocking, so a FIFO that no program writes to reads as empty
  (and is refused as such) instead of hanging the command forever;
* what a reader takes from a stream is bounded by the reader (:func:`read_limited`), since a
  device can deliver bytes without end.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from .errors import N2NError


def open_input(path: str, what: str) -> BinaryIO:
    """`path` opened for binary reading; `what` ("a safetensors file") names the kind in messages.

    A FIFO (named pipe) that no program has open for writing reads as empty at once; one that
    has a writer reads normally (blocking until it writes).

    Raises:
        N2NError: the file is missing, is a folder, or cannot be read (permissions, I/O).
    """
    try:
        f = open(path, "rb", opener=_open_without_waiting)
    except FileNotFoundError:
        raise N2NError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise N2NError(f"{path}: is a folder, not {what}") from None
    except OSError as e:
        raise N2NError(f"{path}: cannot read ({e.strerror})") from None
    try:
        # Reads wait for data again from here on. A FIFO without a writer still reads as empty
        # (end of file) at once, while one with a writer waits for what it writes.
        os.set_blocking(f.fileno(), True)
    except OSError as e:
        f.close()
        raise N2NError(f"{path}: cannot read ({e.strerror})") from None
    return f


def _open_without_waiting(path: str, flags: int) -> int:
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever.
    return os.open(path, flags | os.O_NONBLOCK)


def read_limited(f: BinaryIO, limit: int, source: str, what: str) -> bytes:
    """All of stream `f`, refusing one longer than `limit` bytes (a device like /dev/zero never ends).

    Raises:
        N2NError: naming `source`, `what` it should be and the limit, when the stream is longer.
    """
    data = f.read(limit + 1)
    if len(data) > limit:
        raise N2NError(f"{source}: larger than {limit // (1024 * 1024)} MiB, too large for {what} (is it the right file?)")
    return data
