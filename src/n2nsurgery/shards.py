"""Sharded checkpoints in the Hugging Face layout: an index file and several safetensors shards.

A sharded checkpoint is a folder::

    student/
      model.safetensors.index.json          {"metadata": {...}, "weight_map": {tensor: shard}}
      model-00001-of-00003.safetensors
      model-00002-of-00003.safetensors
      model-00003-of-00003.safetensors

**Reading.** :func:`open_sharded` takes the index file or the folder holding it and returns a
:class:`ShardedCheckpoint`, which answers like one :class:`~n2nsurgery.checkpoint.Checkpoint`
(lazy tensors from each shard's memory map; untouched tensors copied file to file on write).
:func:`~n2nsurgery.checkpoint.open_checkpoint` hands folders and ``.json`` paths here, so every
command that takes a CKPT takes a sharded one.

**Writing.** :func:`write_sharded` plans shards of at most `max_shard_size` tensor bytes (a
tensor larger than that gets a shard of its own, as Hugging Face does), in natural key order
(``layer.2`` before ``layer.10``, so a layer's tensors stay together), and writes them into a
temporary folder beside the destination that is renamed into place once complete.

**Where the architecture lives.** The index's ``metadata`` holds ``total_size`` (an integer, the
sum of the tensor bytes), ``format``, ``n2n.arch``, ``n2n.history`` and any other metadata
carried through; each shard's own metadata is only ``{"format": "pt"}``. One place means no
copies to disagree. A shard opened alone is a plain state_dict fragment without architecture.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Mapping, Optional, Union

import torch

from . import progress
from .checkpoint import (
    Checkpoint,
    FileSpan,
    TensorSource,
    current_umask,
    data_size,
    fd_sink,
    nbytes_of,
    open_checkpoint,
    stream_checkpoint,
)
from .errors import N2NError
from .inputs import open_input

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"  # Hugging Face's name for an unsharded checkpoint in a folder
SHARD_METADATA = {"format": "pt"}
_SHARD_NAME = re.compile(r"^model-\d{5,}-of-\d{5,}\.safetensors$")

# KB, MB, ... are powers of 1000 (as Hugging Face reads "5GB"); KiB, MiB, ... powers of 1024.
_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _UNITS[_p + "b"] = 1000**_i
    _UNITS[_p + "ib"] = 1024**_i
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: Union[str, int]) -> int:
    """A shard size in bytes, from ``500MB``, ``2GiB``, ``1.5GB`` or a plain byte count.

    Raises:
        N2NError: not a size, or less than one byte.

    Example:
        >>> parse_size("2GiB"), parse_size("500MB"), parse_size("4096")
        (2147483648, 500000000, 4096)
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.match(str(text))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise N2NError(f"--max-shard-size: {text!r} is not a size; write e.g. 500MB, 2GiB or a number of bytes")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value < 1:
        raise N2NError(f"--max-shard-size must be at least one byte, got {text!r}")
    return value


def _natural_key(key: str) -> list:
    # Split into text and digit runs: even positions are always text and odd ones numbers, so
    # two keys never compare a number with a string.
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", key))]


def plan_shards(tensors: Mapping[str, TensorSource], max_shard_size: int) -> list:
    """Tensor names per shard: natural key order, each shard at most `max_shard_size` tensor bytes.

    A tensor larger than the limit gets a shard of its own (it cannot be split).
    """
    shards, current, used = [], [], 0
    for key in sorted(tensors, key=_natural_key):
        n = nbytes_of(tensors[key].dtype, tuple(tensors[key].shape))
        if current and used + n > max_shard_size:
            shards.append(current)
            current, used = [], 0
        current.append(key)
        used += n
    if current or not shards:
        shards.append(current)
    return shards


def shard_names(count: int) -> list:
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


# ---------------------------------------------------------------------------------- reading


class ShardedCheckpoint:
    """Several safetensors shards read as one checkpoint (same interface as ``Checkpoint``)."""

    def __init__(self, source: str, shards: dict, where: dict, metadata: dict):
        self.source = source  # the index file
        self.shards: dict[str, Checkpoint] = shards  # shard file name -> open shard
        self._where: dict[str, Checkpoint] = where  # tensor -> its shard, in natural key order
        self.metadata: dict[str, str] = metadata

    @property
    def infos(self) -> dict:
        """Header entries of every tensor (offsets are within each tensor's own shard)."""
        return {k: c.infos[k] for k, c in self._where.items()}

    def keys(self) -> list:
        return list(self._where)

    def __contains__(self, key) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._where[key].dtype(key)

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].get(key)

    def mapped(self, key: str):
        return self._where[key].mapped(key)

    def raw(self, key: str) -> memoryview:
        return self._where[key].raw(key)

    def span(self, key: str) -> Optional[FileSpan]:
        return self._where[key].span(key)

    def shard_of(self, key: str) -> str:
        """The file name of the shard holding `key`."""
        return os.path.basename(self._where[key].source)


def find_index(folder: str) -> Optional[str]:
    """The index file of a sharded-checkpoint folder, or None when it has none."""
    path = os.path.join(folder, INDEX_NAME)
    if os.path.isfile(path):
        return path
    others = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors.index.json"))
    return os.path.join(folder, others[0]) if len(others) == 1 else None


def open_sharded(path: str):
    """Open a sharded checkpoint from its index file or the folder holding it.

    A folder without an index but with a single ``model.safetensors`` (Hugging Face's unsharded
    layout) opens that file.

    Returns:
        A :class:`ShardedCheckpoint` (or a plain ``Checkpoint`` for the unsharded layout).

    Raises:
        N2NError: no index, an index that is not valid, a missing shard, or shards that disagree
            with the index. The message names the file.

    Example:
        >>> _ = write_sharded("student", {"a": torch.ones(4), "b": torch.zeros(4)}, {"format": "pt"}, 16)
        >>> ckpt = open_sharded("student/")
        >>> ckpt.shard_of("b")
        'model-00002-of-00002.safetensors'
    """
    if os.path.isdir(path):
        index = find_index(path)
        if index is None:
            single = os.path.join(path, SINGLE_NAME)
            if os.path.isfile(single):
                return open_checkpoint(single)
            raise N2NError(f"{path}: a folder without {INDEX_NAME} (or {SINGLE_NAME}); give a checkpoint file or a sharded checkpoint's folder")
        path = index
    weight_map, metadata = _read_index(path)
    folder = os.path.dirname(os.path.abspath(path))
    shards = {}
    for name in sorted(set(weight_map.values())):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise N2NError(f"{path}: shard {name!r} named in weight_map is missing from {folder}")
        shards[name] = open_checkpoint(file)
    for name, shard in shards.items():
        for key in shard.keys():
            if weight_map.get(key) != name:
                where = f"maps it to {weight_map[key]!r}" if key in weight_map else "does not list it"
                raise N2NError(f"{shard.source}: holds tensor {key!r}, but the index {path} {where}")
    for key, name in weight_map.items():
        if key not in shards[name]:
            raise N2NError(f"{path}: weight_map puts tensor {key!r} in {name!r}, which does not hold it")
    where = {k: shards[weight_map[k]] for k in sorted(weight_map, key=_natural_key)}
    return ShardedCheckpoint(path, shards, where, metadata)


def _read_index(path: str) -> tuple:
    def bad(msg):
        raise N2NError(f"{path}: {msg}")

    with open_input(path, "a sharded-checkpoint index") as f:
        raw = f.read()
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        bad(f"not a sharded-checkpoint index (invalid JSON: {e})")
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        bad("not a sharded-checkpoint index (no weight_map object)")
    weight_map = index["weight_map"]
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            bad(f"weight_map entry for {key!r} must be a shard file name, got {name!r}")
        norm = os.path.normpath(name)
        if os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep):
            bad(f"weight_map entry for {key!r} names {name!r}, outside the index's folder")
    raw_meta = index.get("metadata", {})
    if raw_meta is None:
        raw_meta = {}
    if not isinstance(raw_meta, dict):
        bad("metadata must be a JSON object")
    # total_size and other numbers are Hugging Face bookkeeping; checkpoint metadata is strings.
    metadata = {k: v for k, v in raw_meta.items() if isinstance(v, str)}
    return weight_map, metadata


# ---------------------------------------------------------------------------------- writing


def write_sharded(dest: str, tensors: Mapping[str, TensorSource], metadata: Mapping[str, str],
                  max_shard_size: Union[int, str]) -> list:
    """Write a sharded checkpoint into folder `dest`, atomically, with deterministic bytes.

    The shards and the index are written into a temporary folder beside `dest` and renamed to
    `dest`. An existing `dest` is replaced only when it holds nothing but a sharded
    checkpoint's files (never a folder with anything else in it), and then only after the new
    files are synced to disk (as :func:`~n2nsurgery.checkpoint.write_checkpoint` does).

    Args:
        dest: the output folder.
        tensors: name -> tensor or :class:`~n2nsurgery.checkpoint.LazyTensor`.
        metadata: checkpoint metadata; goes into the index (see the module notes).
        max_shard_size: bytes per shard, or a size such as ``"2GiB"`` (:func:`parse_size`).

    Returns:
        The shard file names, in order.

    Raises:
        N2NError: a bad size, `dest` is ``-`` or a file name, or it cannot be written.

    Example:
        >>> write_sharded("out", {"a": torch.ones(4), "b": torch.zeros(4)}, {"format": "pt"}, 16)
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """
    limit = parse_size(max_shard_size)
    _check_destination(dest)
    plan = plan_shards(tensors, limit)
    names = shard_names(len(plan))
    parent = os.path.dirname(os.path.abspath(dest))
    base = os.path.basename(os.path.abspath(dest))
    try:
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{base}.", suffix=".tmp")
    except OSError as e:
        raise N2NError(f"{dest}: cannot write in {parent} ({e.strerror})") from None
    replacing = os.path.isdir(dest)  # sync before replacing an old checkpoint, only then
    try:
        with progress.task(f"writing {base}/", data_size(tensors)) as bar:
            for name, keys in zip(names, plan):
                _write_file(os.path.join(tmp, name), lambda fd: stream_checkpoint(fd_sink(fd, bar), {k: tensors[k] for k in keys}, SHARD_METADATA), replacing)
        index = index_json(tensors, metadata, plan, names)
        _write_file(os.path.join(tmp, INDEX_NAME), lambda fd: _write_all(fd, index), replacing)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; give the folder the usual mode
        if replacing:
            _fsync_dir(tmp)
        _move_into_place(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise N2NError(f"{dest}: write failed ({e.strerror})") from None
        raise
    return names


def index_json(tensors: Mapping[str, TensorSource], metadata: Mapping[str, str], plan: list, names: list) -> bytes:
    """The bytes of ``model.safetensors.index.json``: sorted keys, two-space indent, newline."""
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta["total_size"] = data_size(tensors)
    weight_map = {k: name for name, keys in zip(names, plan) for k in keys}
    return (json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _check_destination(dest: str) -> None:
    if dest == "-":
        raise N2NError("a sharded checkpoint is a folder and cannot go to standard output; give -o FOLDER, or drop --max-shard-size")
    if dest.endswith((".safetensors", ".json")):
        raise N2NError(f"{dest}: with --max-shard-size the output is a folder (shards and {INDEX_NAME} go inside it); give a folder name")
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise N2NError(f"{dest}: the output folder {parent} does not exist")
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise N2NError(f"{dest}: exists and is not a folder; give a new folder name for the sharded checkpoint")
    if os.path.isdir(dest):
        others = [n for n in os.listdir(dest) if n != INDEX_NAME and not _SHARD_NAME.match(n)]
        if others or os.path.islink(dest):
            raise N2NError(f"{dest}: the folder exists and holds other files ({others[0] if others else 'it is a link'}); "
                           "n2n replaces only a folder holding a sharded checkpoint; give a new folder name")


def _write_file(path: str, write, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        write(fd)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: str, dest: str) -> None:
    """Rename the finished folder to `dest`; an old sharded checkpoint there is swapped out first."""
    if not os.path.isdir(dest):
        os.rename(tmp, dest)
        return
    # A folder cannot be renamed over a non-empty one: move the old one aside, then delete it.
    parent = os.path.dirname(os.path.abspath(dest))
    old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(dest))}.", suffix=".old")
    os.rename(dest, old)  # onto the empty placeholder folder
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)  # put the old output back
        raise
    shutil.rmtree(old, ignore_errors=True)
