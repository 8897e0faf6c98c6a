"""Opening the files a user names: one clear message for each way it can fail."""

from __future__ import annotations

from typing import BinaryIO

from .errors import N2NError


def open_input(path: str, what: str) -> BinaryIO:
    """`path` opened for binary reading; `what` ("a safetensors file") names the kind in messages.

    Raises:
        N2NError: the file is missing, is a folder, or cannot be read (permissions, I/O).
    """
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise N2NError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise N2NError(f"{path}: is a folder, not {what}") from None
    except OSError as e:
        raise N2NError(f"{path}: cannot read ({e.strerror})") from None
