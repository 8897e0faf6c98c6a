"""Opening whatever a user names as CKPT: one safetensors file, or a sharded checkpoint.

This module sits above :mod:`n2nsurgery.checkpoint` (one file) and :mod:`n2nsurgery.shards`
(an index and its shards, which are opened as single files), so neither of those two needs
to import the other inside a function: the imports run one way, with no cycle.
"""

from __future__ import annotations

import os

from .checkpoint import STDIN, open_checkpoint
from .shards import open_sharded

__all__ = ["open_any"]


def open_any(path: str):
    """Open `path` for lazy reading: a folder or ``.json`` index is a sharded checkpoint, ``-``
    is standard input, anything else one safetensors file.

    Returns:
        A :class:`~n2nsurgery.checkpoint.Checkpoint` or a :class:`~n2nsurgery.shards.ShardedCheckpoint`.

    Raises:
        N2NError: the file or folder cannot be read as a checkpoint; the message names it.

    Example:
        >>> open_any("recipes/mlp.safetensors").shape("fc1.weight")
        (32, 16)
    """
    if path != STDIN and (os.path.isdir(path) or path.endswith(".json")):
        return open_sharded(path)
    return open_checkpoint(path)
