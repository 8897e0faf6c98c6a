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
Every shard's header is read and checked when the checkpoint is opened, but at most
:data:`OPEN_SHARDS` shard files are held open at a time (thousands of shards would exceed the
usual limit of 1024 open files); the others are reopened when next needed.
:func:`~n2nsurgery.storage.open_any` hands folders and ``.json`` paths here, so every command
that takes a CKPT takes a sharded one.

**Writing.** :func:`write_sharded` plans shards of at most `max_shard_size` tensor bytes (a
tensor larger than that gets a shard of its own, as Hugging Face does), in natural key order
(``layer.2`` before ``layer.10``, so a layer's tensors stay together), and writes them into a
temporary folder beside the destination that is renamed into place once complete. An existing
folder is replaced only when it holds nothing but regular files n2n writes
(:func:`check_destination`), and only those files are deleted.

**Where the architecture lives.** The index's ``metadata`` holds ``total_size`` (an integer, the
sum of the tensor bytes), ``format``, ``n2n.arch``, ``n2n.history`` and any other metadata
carried through; each shard's own metadata is only ``{"format": "pt"}``. One place means no
copies to disagree. A shard opened alone is a plain state_dict fragment without architecture.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections import OrderedDict
from fractions import Fraction
from typing import Mapping, Optional, Union

import torch

from . import progress
from .checkpoint import (
    Checkpoint,
    HeaderIndex,
    TempPath,
    TensorSource,
    data_size,
    fd_sink,
    nbytes_of,
    new_file_mode,
    open_checkpoint,
    stream_checkpoint,
)
from .errors import N2NError
from .inputs import open_input
from .inputs import read_limited
from .jsonio import JSONRefused, parse_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"  # Hugging Face's name for an unsharded checkpoint in a folder
SHARD_METADATA = {"format": "pt"}
_SHARD_NAME = re.compile(r"^model-\d{5,}-of-\d{5,}\.safetensors$")

# KB, MB, ... are powers of 1000 (as Hugging Face reads "5GB"); KiB, MiB, ... powers of 1024.
_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _UNITS[_p + "b"] = 1000**_i
    _UNITS[_p + "ib"] = 1024**_i
MAX_SHARD_SIZE = 1024**6  # 1 EiB: a file system's largest file is smaller (ext4 16 TiB, XFS 8 EiB)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: Union[str, int]) -> int:
    """A shard size in bytes, from ``500MB``, ``2GiB``, ``1.5GB`` or a plain byte count.

    Raises:
        N2NError: not a size, less than one byte, or more than :data:`MAX_SHARD_SIZE`.

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
        value = math.floor(Fraction(m.group(1)) * _UNITS[unit])  # exact: 400 digits are no float
    if value < 1:
        raise N2NError(f"--max-shard-size must be at least one byte, got {text!r}")
    if value > MAX_SHARD_SIZE:
        raise N2NError(f"--max-shard-size: {_short(text)} is more than any file can hold (at most 1EiB); "
                       "write e.g. 5GB, or drop --max-shard-size for one file")
    return value


def _short(text) -> str:
    text = str(text)
    return repr(text if len(text) <= 40 else text[:37] + "...")


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


# Shards held open at once (each holds two descriptors: the file and its map). A checkpoint
# written with a small --max-shard-size may have thousands of shards, more than the usual
# limit of 1024 open files, so the others are closed and reopened when next needed.
OPEN_SHARDS = 32


class _OpenShards:
    """The shards open now, least recently used first; opening one more closes the oldest."""

    def __init__(self, limit: int = OPEN_SHARDS):
        self.limit = limit
        self._open: OrderedDict = OrderedDict()  # shard file -> Checkpoint

    def get(self, shard: "_Shard") -> Checkpoint:
        ckpt = self._open.get(shard.source)
        if ckpt is not None:
            self._open.move_to_end(shard.source)
            return ckpt
        ckpt = open_checkpoint(shard.source)
        if ckpt.infos != shard.infos:
            ckpt.close()
            raise N2NError(f"{shard.source}: the shard changed while it was being read (was it overwritten?)")
        self._open[shard.source] = ckpt
        while len(self._open) > self.limit:
            self._open.popitem(last=False)[1].close()
        return ckpt


class _Shard(HeaderIndex):
    """One shard: its header, read when the checkpoint is opened; its file, open only while used."""

    def __init__(self, source: str, infos: dict, mappable: bool, pool: _OpenShards):
        self.source = source
        self.infos = infos
        self._mappable = mappable  # False: read into memory (standard input, no mmap): no spans
        self._pool = pool

    def open(self) -> Checkpoint:
        """The shard's file, opened now unless it still is (closing the least recently used)."""
        return self._pool.get(self)

    def get(self, key: str) -> torch.Tensor:
        return self.open().get(key)

    def mapped(self, key: str):
        return self.open().mapped(key)

    def raw(self, key: str) -> memoryview:
        return self.open().raw(key)

    def span(self, key: str) -> Optional["_ShardSpan"]:
        info = self.infos[key]
        return _ShardSpan(self, key, info.start, info.end) if self._mappable else None


class _ShardSpan:
    """A :class:`~n2nsurgery.checkpoint.FileSpan` whose descriptor is looked up when used: the
    writer asks for every span before it copies any, and the shard may be closed meanwhile."""

    __slots__ = ("shard", "key", "start", "end")

    def __init__(self, shard: _Shard, key: str, start: int, end: int):
        self.shard, self.key, self.start, self.end = shard, key, start, end

    @property
    def fd(self) -> int:
        return self.shard.open().span(self.key).fd

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class ShardedCheckpoint:
    """Several safetensors shards read as one checkpoint (same interface as ``Checkpoint``)."""

    def __init__(self, source: str, shards: dict, where: dict, metadata: dict):
        self.source = source  # the index file
        self.shards: dict[str, _Shard] = shards  # shard file name -> shard
        self._where: dict[str, _Shard] = where  # tensor -> its shard, in natural key order
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

    def span(self, key: str):
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
    shards, pool = {}, _OpenShards()
    for name in sorted(set(weight_map.values())):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise N2NError(f"{path}: shard {name!r} named in weight_map is missing from {folder}")
        shards[name] = _read_shard_header(file, pool)
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


def _read_shard_header(file: str, pool: _OpenShards) -> _Shard:
    """Read one shard's header, then close it: only a few shards are held open at a time."""
    ckpt = open_checkpoint(file)
    try:
        keys = ckpt.keys()
        mappable = bool(keys) and ckpt.span(keys[0]) is not None  # a file we can copy from
        return _Shard(file, ckpt.infos, mappable, pool)
    finally:
        ckpt.close()


def _read_index(path: str) -> tuple:
    def bad(msg):
        raise N2NError(f"{path}: {msg}")

    with open_input(path, "a sharded-checkpoint index") as f:
        raw = read_limited(f, 64 * 1024 * 1024, path, "a sharded-checkpoint index")  # real ones: < 10 MiB
    try:
        index = parse_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, JSONRefused) as e:
        bad(f"not a sharded-checkpoint index ({e})")
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        bad("not a sharded-checkpoint index (no weight_map object)")
    weight_map = index["weight_map"]
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            bad(f"weight_map entry for {key!r} must be a shard file name, got {name!r}")
        norm = os.path.normpath(name)
        if os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep):
            bad(f"weight_map entry for {key!r} names {name!r}, outside the index's folder")
        if name.endswith(".json"):  # the index itself, or another one: shards are safetensors files
            bad(f"weight_map entry for {key!r} names {name!r}, an index, not a shard; "
                "each entry must name a .safetensors file beside the index")
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
                  max_shard_size: Union[int, str], mode: Optional[int] = None) -> list:
    """Write a sharded checkpoint into folder `dest`, atomically, with deterministic bytes.

    The shards and the index are written into a temporary folder beside `dest` and renamed to
    `dest`. An existing `dest` is replaced only when it holds nothing but a sharded
    checkpoint's files (regular files with the names n2n writes: never a folder with anything
    else in it, see :func:`check_destination`), and then only after the new files are synced to
    disk (as :func:`~n2nsurgery.checkpoint.write_checkpoint` does).

    Permissions: a replaced checkpoint keeps its modes (its index file's for the files, its
    folder's for the folder); a new one gets `mode` (the input's) minus the umask, the folder
    the same with search permission wherever it is readable (0600 gives 0700).

    Args:
        dest: the output folder.
        tensors: name -> tensor or :class:`~n2nsurgery.checkpoint.LazyTensor`.
        metadata: checkpoint metadata; goes into the index (see the module notes).
        max_shard_size: bytes per shard, or a size such as ``"2GiB"`` (:func:`parse_size`).
        mode: permission bits of the input file; None: 0o666.

    Returns:
        The shard file names, in order.

    Raises:
        N2NError: a bad size, `dest` is ``-`` or a file name, or it cannot be written.

    Example:
        >>> write_sharded("out", {"a": torch.ones(4), "b": torch.zeros(4)}, {"format": "pt"}, 16)
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """
    limit = parse_size(max_shard_size)
    check_destination(dest)
    plan = plan_shards(tensors, limit)
    names = shard_names(len(plan))
    parent = os.path.dirname(os.path.abspath(dest))
    base = os.path.basename(os.path.abspath(dest))
    replacing = os.path.isdir(dest)  # sync before replacing an old checkpoint, only then
    file_mode, folder_mode = _output_modes(dest, mode)
    temp = TempPath(parent, base, ".tmp")
    try:
        try:
            tmp = temp.create_dir()
        except OSError as e:
            raise N2NError(f"{dest}: cannot write in {parent} ({e.strerror})") from None
        with progress.task(f"writing {base}/", data_size(tensors)) as bar:
            write_shard_files(tmp, tensors, metadata, plan, names, bar, replacing, file_mode)
        os.chmod(tmp, folder_mode)  # mkdtemp makes 0700
        if replacing:
            _fsync_dir(tmp)
        _move_into_place(tmp, dest)
    except BaseException as e:
        temp.remove()
        if isinstance(e, OSError):
            raise N2NError(f"{dest}: write failed ({e.strerror})") from None
        raise
    return names


def _output_modes(dest: str, mode: Optional[int]) -> tuple:
    """(file mode, folder mode) of a sharded checkpoint written to `dest` (see write_sharded)."""
    try:
        old_index = os.lstat(os.path.join(dest, INDEX_NAME))
        old_folder = os.lstat(dest)
    except OSError:  # nothing there, or no index: a new checkpoint
        file_mode = new_file_mode(mode)
        return file_mode, file_mode | (file_mode & 0o444) >> 2  # r-- gives r-x: a folder to list
    return stat.S_IMODE(old_index.st_mode) & 0o777, stat.S_IMODE(old_folder.st_mode)


def write_shard_files(folder: str, tensors: Mapping[str, TensorSource], metadata: Mapping[str, str], plan: list,
                      names: list, bar, sync: bool, file_mode: int) -> None:
    """The shards of `plan` (named `names`) and their index, into `folder`: the temporary folder
    a sharded write (this module's, or a Hugging Face folder's) builds before its rename."""
    for name, keys in zip(names, plan):
        part = {k: tensors[k] for k in keys}
        _write_file(os.path.join(folder, name), lambda fd, part=part: stream_checkpoint(fd_sink(fd, bar), part, SHARD_METADATA), sync, file_mode)
    index = index_json(tensors, metadata, plan, names)
    _write_file(os.path.join(folder, INDEX_NAME), lambda fd: _write_all(fd, index), sync, file_mode)


def index_json(tensors: Mapping[str, TensorSource], metadata: Mapping[str, str], plan: list, names: list) -> bytes:
    """The bytes of ``model.safetensors.index.json``: sorted keys, two-space indent, newline."""
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta["total_size"] = data_size(tensors)
    weight_map = {k: name for name, keys in zip(names, plan) for k in keys}
    return (json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def check_destination(dest: str) -> None:
    """Refuse an output folder for a sharded checkpoint that n2n must not write or replace.

    Called before any work (:func:`n2nsurgery.guards.check_output`) and again by
    :func:`write_sharded`. An existing folder is replaced only when every entry is a regular
    file named as n2n names shards and the index: a sub-folder, a link or a device with such a
    name is the user's, and replacing the folder would delete it.

    Raises:
        N2NError: naming the destination, or the first entry that is not n2n's.
    """
    if dest == "-":
        raise N2NError("a sharded checkpoint is a folder and cannot go to standard output; give -o FOLDER, or drop --max-shard-size")
    if dest.endswith((".safetensors", ".json")):
        raise N2NError(f"{dest}: with --max-shard-size the output is a folder (shards and {INDEX_NAME} go inside it); give a folder name")
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise N2NError(f"{dest}: the output folder {parent} does not exist")
    if os.path.islink(dest):
        raise N2NError(f"{dest}: is a symbolic link; n2n replaces only a folder holding a sharded checkpoint; give a new folder name")
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise N2NError(f"{dest}: exists and is not a folder; give a new folder name for the sharded checkpoint")
    if os.path.isdir(dest):
        for name in sorted(os.listdir(dest)):
            if not _is_ours(os.path.join(dest, name)):
                raise N2NError(f"{dest}: the folder exists and holds other files ({name!r} is not a file n2n writes); "
                               "n2n replaces only a folder holding nothing but a sharded checkpoint; give a new folder name")


def _is_ours(path: str) -> bool:
    """Whether `path` is a file a sharded write makes: a regular file (not a link, a folder or
    a device) named as a shard or the index."""
    name = os.path.basename(path)
    if name != INDEX_NAME and not _SHARD_NAME.match(name):
        return False
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _write_file(path: str, write, sync: bool, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write(fd)
        os.fchmod(fd, mode)  # not left to the umask: see write_sharded's permissions
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


def _move_into_place(tmp: str, dest: str, ours=None) -> None:
    """Rename the finished folder to `dest`; an old sharded checkpoint there is swapped out first.

    Interrupted at any point, `dest` holds the old checkpoint or the new one, never neither.
    `ours(path)`: which files of the old folder to delete (default: a sharded checkpoint's).
    """
    if not os.path.isdir(dest):
        os.rename(tmp, dest)
        return
    # A folder cannot be renamed over a non-empty one: move the old one aside, then delete it.
    parent = os.path.dirname(os.path.abspath(dest))
    old = TempPath(parent, os.path.basename(os.path.abspath(dest)), ".old")
    try:
        old.create_dir()
        os.rename(dest, old.path)  # onto the empty placeholder folder
        os.rename(tmp, dest)
    except BaseException:
        if old.path is not None and not os.path.lexists(dest) and os.path.isdir(old.path):
            os.rename(old.path, dest)  # put the old output back
        elif old.path is not None:
            _remove_old(old.path, ours)  # the empty placeholder, or the old output once the new is in place
        raise
    _remove_old(old.path, ours)


def _remove_old(folder: str, ours=None) -> None:
    """Delete the replaced checkpoint: only n2n's own files, so anything that appeared in it
    since :func:`check_destination` looked stays (in the ``.old`` folder) rather than being lost."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if (ours or _is_ours)(path):
            os.unlink(path)
    try:
        os.rmdir(folder)
    except OSError:
        pass
