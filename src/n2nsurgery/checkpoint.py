"""Safetensors checkpoints: a lazy, validating reader and a deterministic, atomic writer.

Why our own header handling rather than ``safetensors.torch.load_file``/``save_file``:

* the reader validates the header itself, so a truncated or corrupt file gets one clear message
  naming the file and what is wrong, before any tensor is touched;
* nothing is read until it is used: :meth:`Checkpoint.get` reads one tensor into fresh memory
  (``pread``), which is freed when the tensor is dropped, so memory holds the tensors in use and
  not every tensor ever read (as pages of a memory map would); passes that only read a tensor
  (the finiteness check, remap sources, verification) use :meth:`Checkpoint.mapped` instead,
  a view of the memory map that is unmapped right after, which saves the copy; nothing we do
  with a tensor can reach the input file;
* ``save_file`` writes the metadata map in a different key order in each process (docs/design.md#io-and-streaming), so
  "same seed, same bytes" needs a header we write ourselves, with sorted keys; writing it
  ourselves also lets us stream tensor bytes one at a time instead of building the whole file in
  memory.

The files we write are ordinary safetensors files: the test-suite reads every one of them back
with the safetensors library.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import mmap
import os
import secrets
import shutil
import stat
import struct
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional, Union

import torch

from . import progress
from .errors import N2NError
from .memory import check_allocation, format_bytes
from .inputs import open_input
from .jsonio import JSONRefused, gc_paused, parse_json

# safetensors dtype code <-> torch dtype
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# Unsigned 16/32/64-bit tensors exist in torch from 2.3; carried through unchanged where present.
DTYPES.update({code: getattr(torch, name) for code, name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")) if hasattr(torch, name)})
CODES = {v: k for k, v in DTYPES.items()}

MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_ALIGN = 2 * 1024 * 1024  # see build_header: alignment of the data we write, at most
STDIN = "-"


def dtype_code(dtype: torch.dtype) -> str:
    try:
        return CODES[dtype]
    except KeyError:
        raise N2NError(f"dtype {dtype} cannot be stored in a safetensors checkpoint by this tool") from None


@dataclass(frozen=True, slots=True)  # slots: a header may describe a million of them
class TensorInfo:
    """Where one tensor lives in a checkpoint file, from its header."""

    dtype: torch.dtype
    shape: tuple
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class HeaderIndex:
    """What a parsed header alone answers (no tensor is read): the keys, each tensor's shape and
    dtype. Shared by :class:`Checkpoint` and a sharded checkpoint's lazily opened shards."""

    infos: dict

    def keys(self) -> list:
        return list(self.infos)

    def __contains__(self, key) -> bool:
        return key in self.infos

    def shape(self, key: str) -> tuple:
        return self.infos[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self.infos[key].dtype


class Checkpoint(HeaderIndex):
    """A safetensors file opened for reading. Tensors are loaded lazily, on :meth:`get`.

    Example:
        >>> ckpt = open_checkpoint("recipes/mlp.safetensors")
        >>> ckpt.shape("fc1.weight")
        (32, 16)
    """

    def __init__(self, source: str, buffer, infos: dict, metadata: dict, file=None):
        self.source = source  # the file name, or "<stdin>"
        self._buffer = buffer  # mmap (copy-on-write) or bytearray
        self.infos: dict[str, TensorInfo] = infos  # in file order
        self.metadata: dict[str, str] = metadata
        # The open input file (None for stdin): lets the writer copy untouched tensors
        # file-to-file in the kernel, so their bytes never enter this process.
        self._file = file

    def get(self, key: str) -> torch.Tensor:
        """The tensor stored under `key`, read from the file now (a fresh tensor, never a view).

        The tensor is the caller's to keep or modify, and its memory is freed when it is
        dropped (pages of a map that were read would stay counted against this process until
        it ends). A pass that only reads tensors should use :meth:`mapped`, which saves the copy.
        """
        info = self.infos[key]
        if math.prod(info.shape) == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if self._file is None:  # standard input: already in memory, so a view costs nothing
            if info.start % info.dtype.itemsize:  # frombuffer needs alignment: copy this one
                return torch.frombuffer(bytearray(self._buffer[info.start : info.end]), dtype=info.dtype).reshape(info.shape)
            return torch.frombuffer(self._buffer, dtype=info.dtype, count=math.prod(info.shape), offset=info.start).reshape(info.shape)
        out = torch.empty(info.shape, dtype=info.dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        fd, pos, done = self._file.fileno(), info.start, 0
        while done < info.nbytes:
            n = os.preadv(fd, [view[done : done + _CHUNK]], pos + done)
            if n <= 0:
                raise N2NError(f"{self.source}: the file became shorter while it was being read (was it overwritten?)")
            done += n
        return out

    @contextlib.contextmanager
    def mapped(self, key: str) -> Iterator[torch.Tensor]:
        """`key` as a tensor over the memory map, for a pass that only reads it: no copy.

        Faster than :meth:`get` for a pass that only reads (the finiteness check, the source
        of a remap, a node's parameters during verification): no fresh memory, no copy. On leaving the block the pages are
        unmapped from this process (they stay in the page cache), so a pass over every tensor
        still holds one tensor at a time. The view must not be kept beyond the block, nor
        written (the map is copy-on-write: a write would cost memory, never reach the file).
        """
        info = self.infos[key]
        if self._file is None or math.prod(info.shape) == 0 or info.start % info.dtype.itemsize:
            yield self.get(key)  # standard input (already in memory), empty, or misaligned
            return
        # Touching a mapped page past the end of a file that another program truncated kills the
        # process (SIGBUS) instead of raising; checking first leaves only the moments of the read.
        if os.fstat(self._file.fileno()).st_size < info.end:
            raise N2NError(f"{self.source}: the file became shorter while it was being read (was it overwritten?)")
        view = torch.frombuffer(self._buffer, dtype=info.dtype, count=math.prod(info.shape), offset=info.start)
        try:
            yield view.reshape(info.shape)
        finally:
            del view
            # closed: the shard was closed meanwhile (shards.py keeps few open); nothing to give back
            if hasattr(self._buffer, "madvise") and hasattr(mmap, "MADV_DONTNEED") and not self._buffer.closed:
                start = info.start - info.start % mmap.PAGESIZE
                self._buffer.madvise(mmap.MADV_DONTNEED, start, info.end - start)

    def close(self) -> None:
        """Close the input file and its map (a map still viewed by a tensor is freed with it)."""
        if self._file is not None:
            self._file.close()
        if not isinstance(self._buffer, (bytes, bytearray)):  # a map
            try:
                self._buffer.close()
            except BufferError:  # a tensor still views it: it is unmapped when the last view goes
                pass

    def raw(self, key: str) -> memoryview:
        """The stored bytes of `key`, without going through a tensor."""
        info = self.infos[key]
        return memoryview(self._buffer)[info.start : info.end]

    def span(self, key: str) -> Optional["FileSpan"]:
        """Where the bytes of `key` lie in the input file; None when read from standard input."""
        if self._file is None:
            return None
        info = self.infos[key]
        return FileSpan(self._file.fileno(), info.start, info.end)


def open_checkpoint(path: str) -> Checkpoint:
    """Open a safetensors checkpoint for lazy reading; ``-`` reads standard input.

    One file only: :func:`n2nsurgery.storage.open_any` also opens sharded checkpoints.

    Raises:
        N2NError: the file is missing, unreadable, truncated or not a safetensors file.
    """
    if path == STDIN:
        if sys.stdin is None or sys.stdin.isatty():
            raise N2NError("standard input is a terminal: pipe a checkpoint into '-' or give a file path")
        return _read_stream(sys.stdin.buffer, "<stdin>")

    f = open_input(path, "a safetensors file")
    st = os.fstat(f.fileno())
    buffer = _map(f) if stat.S_ISREG(st.st_mode) and st.st_size > 0 else None
    if buffer is not None:
        try:
            return _parse(buffer, path, st.st_size, f)
        except BaseException:
            f.close()
            raise
    with f:  # a pipe, a device, process substitution: read what the header describes
        return _read_stream(f, path)



def _map(f) -> Optional[mmap.mmap]:
    """A copy-on-write map of file `f`: pages load on demand and nothing can reach the file on
    disk. The file stays open (read-only) for kernel-side copies of untouched tensors (see
    FileSpan). None where the file system cannot map files (some FUSE and /proc-like files
    raise ENODEV): the caller then reads the file into memory instead."""
    try:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError:
        return None


# Most tensors one checkpoint may hold. Parsing costs about 1 KiB of memory and a few
# microseconds per tensor, so a header that claims millions of tiny tensors is refused before it
# is parsed; the largest published models hold well under 100,000 tensors per file.
MAX_TENSORS = 1_000_000

_CONVERT_PICKLE = (
    "python -c \"import torch; from safetensors.torch import save_file; "
    "save_file(torch.load('model.pt', weights_only=True), 'model.safetensors')\""
)


def _read_stream(f, source: str) -> Checkpoint:
    """Read a checkpoint from a stream (standard input, a pipe, a device), bounded by its header.

    The header is read and validated before any tensor data, and then exactly the bytes it
    describes are read: a stream that never ends (``/dev/zero``) or claims more data than memory
    can hold is refused after its first bytes, not read until memory runs out.
    """
    head = _read_upto(f, 9)  # the length, and the header's first byte
    if not head and source == "<stdin>":
        raise N2NError("standard input is empty: the command before '|' wrote no checkpoint (did it fail?)")
    if len(head) == 9 and not _looks_like_safetensors(head):
        head += _read_upto(f, 300)  # enough to tell what it is instead (_header_length refuses it)
    hlen = _header_length(head, source, len(head))
    header = head[8:] + _read_upto(f, hlen - len(head[8:]))
    if len(header) < hlen:
        _parse(head[:8] + header, source, 8 + len(header))  # raises: truncated
    with gc_paused():
        entries, metadata = _parse_header(header, source)
    need = max((e for _, _, _, _, e in entries), default=0)
    check_allocation(need, f"reading {source} (its header announces {format_bytes(need)} of tensors)",
                     "save it to a file and pass the path: a file is read on demand, a stream must be held in memory")
    buffer = bytearray(head[:8])
    buffer += header
    with progress.task(f"reading {source}", None) as bar:
        while len(buffer) < 8 + hlen + need:
            chunk = f.read(min(_CHUNK, 8 + hlen + need - len(buffer)))
            if not chunk:
                break
            buffer += chunk
            bar.advance(len(chunk))
    if len(buffer) == 8 + hlen + need and f.read(1):
        raise N2NError(f"{source}: corrupt: more bytes follow the last tensor than the header describes")
    with gc_paused():
        return _layout(buffer, source, len(buffer), hlen, entries, metadata, None)


def _read_upto(f, n: int) -> bytes:
    """Up to `n` bytes of stream `f`: fewer only at its end."""
    parts, got = [], 0
    while got < n:
        chunk = f.read(min(n - got, _CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _foreign_format(head: bytes) -> Optional[str]:
    """What a file that is not safetensors looks like, from its first bytes; None when unknown."""
    if head.startswith(b"PK\x03\x04"):
        # torch.save writes a zip archive whose entries are "<name>/data.pkl", "<name>/version",
        # "<name>/byteorder"...; the first entry's name starts at byte 30 of the archive.
        name_len = int.from_bytes(head[26:28], "little")
        name = head[30 : 30 + name_len]
        if len(name) < name_len or any(part in name for part in (b"data.pkl", b"version", b"byteorder", b"/data/")):
            return "PyTorch checkpoint (torch.save writes a zip archive holding a pickle)"
        return "zip archive"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle's PROTO opcode
        return "PyTorch pickle (or another Python pickle)"
    return None


def _looks_like_safetensors(head: bytes) -> bool:
    """Whether the first 9 bytes are a plausible header length followed by a header's "{"."""
    (hlen,) = struct.unpack("<Q", head[:8])
    return 2 <= hlen <= MAX_HEADER and head[8:9] == b"{"  # the shortest header is "{}"


def _header_length(head: bytes, source: str, size: int) -> int:
    """The header length that the first bytes (`head`, up to 300 of them) announce.

    Raises:
        N2NError: the length is implausible, or the file is something else (a PyTorch pickle, a
            zip archive: said so, with how to convert it).
    """
    def bad(msg):
        raise N2NError(f"{source}: {msg}")

    if size == 8 or (size > 8 and _looks_like_safetensors(head)):
        (hlen,) = struct.unpack("<Q", head[:8])
        if 2 <= hlen <= MAX_HEADER:
            return hlen  # the caller reports a header cut short
    foreign = _foreign_format(bytes(head))
    if foreign == "zip archive":
        bad("is a zip archive, not a safetensors file")
    if foreign is not None:
        bad(f"looks like a {foreign}, not a safetensors file; n2n never unpickles files (loading a pickle can run "
            f"any code), so convert it once, where you trust it: {_CONVERT_PICKLE}")
    if size < 8:
        bad(f"not a safetensors file (only {size} bytes; truncated or empty)")
    (hlen,) = struct.unpack("<Q", head[:8])
    if hlen > MAX_HEADER or hlen < 2:
        bad(f"not a safetensors file (header length {hlen} is implausible)")
    bad("not a safetensors file (the header is not JSON)")


def _parse(buffer, source: str, size: int, file=None) -> Checkpoint:
    hlen = _header_length(bytes(buffer[: min(size, 300)]), source, size)
    if 8 + hlen > size:
        raise N2NError(f"{source}: truncated: the header says {hlen} bytes but the file has only {size - 8} after the length")
    with gc_paused():  # a header of many tensors builds many objects, none of them cyclic
        entries, metadata = _parse_header(bytes(buffer[8 : 8 + hlen]), source)
        return _layout(buffer, source, size, hlen, entries, metadata, file)


def _parse_header(raw: bytes, source: str) -> tuple:
    """The tensors ((key, dtype, shape, begin, end), offsets relative to the data) and the
    metadata of a header's JSON bytes, everything checked that does not depend on the file size."""
    def bad(msg):
        raise N2NError(f"{source}: {msg}")

    if not raw.startswith(b"{"):
        bad("not a safetensors file (the header is not JSON)")
    claimed = raw.count(b'"data_offsets"')  # an upper bound on the tensor count, without parsing
    if claimed > MAX_TENSORS:
        bad(f"the header describes {claimed} tensors, more than the {MAX_TENSORS} this tool reads from one file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        bad("not a safetensors file (the header is not JSON)")
    try:
        header = parse_json(text, max_depth=None)  # the schema checks below bound the depth
    except JSONRefused as e:
        if str(e).startswith("invalid JSON"):
            bad("not a safetensors file (the header is not JSON)")
        bad(f"corrupt header: {e}")
    if not isinstance(header, dict):
        bad("not a safetensors file (the header is not a JSON object)")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        bad("corrupt header: __metadata__ must map strings to strings")
    _check_unicode([*metadata, *metadata.values(), *header], source)
    entries = [_entry(key, entry, source) for key, entry in header.items()]
    return entries, metadata


def _check_unicode(names: list, source: str) -> None:
    """Refuse a lone surrogate ("\\udc80": JSON can escape one, no UTF-8 file can hold one)."""
    try:
        "".join(names).encode("utf-8")  # one pass for all; only on failure find which
    except UnicodeEncodeError:
        for name in names:
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise N2NError(f"{source}: corrupt header: name or metadata {name[:60]!r} is not valid Unicode (it holds a lone surrogate)") from None


_ENTRY_KEYS = frozenset(("dtype", "shape", "data_offsets"))


def _entry(key: str, entry, source: str) -> tuple:
    """(key, dtype, shape, begin, end) of one header entry, checked. Written for speed with
    ``type(x) is int`` (which also refuses bool) and C-level passes over the shape, since a
    header may hold a million entries."""
    def bad(msg):
        raise N2NError(f"{source}: {msg}")

    if type(entry) is not dict or not entry.keys() <= _ENTRY_KEYS:
        bad(f"corrupt header entry for tensor {key!r}")
    code = entry.get("dtype")
    dtype = DTYPES.get(code) if type(code) is str else None
    if dtype is None:
        bad(f"tensor {key!r} has dtype {code!r}, which this tool does not support")
    shape = entry.get("shape")
    if type(shape) is not list or not set(map(type, shape)) <= {int} or (shape and not 0 <= min(shape) <= max(shape) < 2**63):
        bad(f"tensor {key!r} has an invalid shape {shape!r}")
    if 0 in shape and math.prod(s for s in shape if s) >= 2**63:  # torch counts elements (and strides) in int64
        bad(f"tensor {key!r} has an invalid shape {shape!r} (more than 2**63 elements)")
    offs = entry.get("data_offsets")
    if type(offs) is not list or len(offs) != 2 or type(offs[0]) is not int or type(offs[1]) is not int or not 0 <= offs[0] <= offs[1]:
        bad(f"tensor {key!r} has invalid data_offsets {offs!r}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != offs[1] - offs[0]:
        bad(f"tensor {key!r}: shape {shape} of {code} needs {nbytes} bytes but data_offsets span {offs[1] - offs[0]}")
    return key, dtype, tuple(shape), offs[0], offs[1]


def _layout(buffer, source: str, size: int, hlen: int, entries: list, metadata: dict, file) -> Checkpoint:
    """The checkpoint, once every tensor is found to lie inside the data, without gaps or overlaps."""
    def bad(msg):
        raise N2NError(f"{source}: {msg}")

    data_start = 8 + hlen
    data_len = size - data_start
    infos = {}
    for key, dtype, shape, b, e in entries:
        if e > data_len:
            bad(f"truncated: tensor {key!r} ends at byte {e} of the data but the file holds only {data_len}")
        infos[key] = TensorInfo(dtype, shape, data_start + b, data_start + e)
    pos = 0
    for b, e, key in sorted((b, e, key) for key, _, _, b, e in entries):
        if b != pos:
            bad(f"corrupt header: tensor {key!r} starts at byte {b} of the data, expected {pos} (overlap or gap)")
        pos = e
    if pos != data_len:
        bad(f"corrupt: {data_len - pos} bytes after the last tensor")
    return Checkpoint(source, buffer, infos, dict(metadata), file)


# ----------------------------------------------------------------------------------- writing
#
# The writer streams: the header is computed from the planned dtypes and shapes first, then each
# tensor's bytes are written in header order and dropped before the next is fetched, so memory
# holds one changed tensor at a time. Untouched tensors (a LazyTensor with a FileSpan) are copied
# from the input file by the kernel (copy_file_range, else sendfile, else bounded pread/write),
# so their bytes never pass through Python objects or this process's memory map.

_CHUNK = 64 * 1024 * 1024  # bytes per write/copy call: bounds buffers and paces the progress bar

# errno values that mean "this pair of files cannot be copied this way": try the next way.
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.ESPIPE}


@dataclass(frozen=True)
class FileSpan:
    """A byte range of an open input file (its descriptor, absolute start and end offsets)."""

    fd: int
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class LazyTensor:
    """A tensor the writer asks for only when it writes it, and drops right after.

    Attributes:
        dtype, shape: what the header announces; fetch must deliver exactly that.
        fetch: returns the tensor, or its raw little-endian bytes. Called at most once per write.
        span: where the same bytes already lie in an input file, for untouched tensors; the
            writer then copies them file-to-file and never calls fetch.

    Example:
        >>> lazy = LazyTensor(torch.float32, (2, 3), lambda: torch.zeros(2, 3))
        >>> lazy.tensor().shape
        torch.Size([2, 3])
    """

    dtype: torch.dtype
    shape: tuple
    fetch: Callable[[], Union[torch.Tensor, memoryview, bytes]]
    span: Optional[FileSpan] = None

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)

    def tensor(self) -> torch.Tensor:
        """Fetch the value as a tensor (raw bytes are copied into a fresh tensor)."""
        value = self.fetch()
        if isinstance(value, torch.Tensor):
            return value
        if len(value) == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.frombuffer(bytearray(value), dtype=self.dtype).reshape(self.shape)


# What the writer accepts for one tensor: a tensor, or a LazyTensor.
TensorSource = Union[torch.Tensor, LazyTensor]


def nbytes_of(dtype: torch.dtype, shape) -> int:
    """Bytes a tensor of `dtype` and `shape` takes in a checkpoint."""
    return math.prod(shape) * dtype.itemsize


def _meta(src) -> tuple:
    return src.dtype, tuple(src.shape)


def _bytes_of(src) -> Union[memoryview, bytes]:
    value = src if isinstance(src, torch.Tensor) else src.fetch()
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        if t.numel() == 0:
            return b""
        return memoryview(t.reshape(-1).view(torch.uint8).numpy())
    return value


def build_header(tensors: Mapping[str, TensorSource], metadata: Mapping[str, str]) -> tuple:
    """The header bytes and the order tensors are written in.

    The layout is chosen so that copying the file is fast: the kernel copies a tensor into an
    offset aligned to 64 KiB-2 MiB up to 1.5x faster than into one aligned only to 4 KiB, and
    2.5x faster than into a misaligned one (``copy_file_range`` on ext4, measured by
    benchmarks/bench_scale.py). So:

    * tensors go in decreasing order of the largest power of two dividing their size (capped
      at :func:`data_alignment`), then by name: each then starts at a multiple of that power,
      which is also a multiple of its element size, as safetensors readers expect;
    * the header is padded with spaces (as the format allows) so the data starts at a multiple
      of :func:`data_alignment`, which grows with the data (2 MiB from 512 MiB of tensors) so the
      padding stays under 1% of the file.

    JSON keys are sorted, so the same tensors and metadata always give the same bytes.
    """
    align = data_alignment(data_size(tensors))

    def sort_key(k):
        n = nbytes_of(*_meta(tensors[k]))
        return (-min(n & -n if n else align, align), k)  # n & -n: the largest power of two dividing n

    order = sorted(tensors, key=sort_key)
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    pos = 0
    for k in order:
        dtype, shape = _meta(tensors[k])
        n = nbytes_of(dtype, shape)
        header[k] = {"dtype": dtype_code(dtype), "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % align)
    return struct.pack("<Q", len(raw)) + raw, order


def data_alignment(nbytes: int) -> int:
    """Where the data of a checkpoint with `nbytes` of tensors starts: a multiple of this.

    The largest power of two at most ``nbytes / 256``, between 8 bytes (element alignment) and
    2 MiB (a huge page: more buys nothing).
    """
    return max(8, min(MAX_ALIGN, 1 << max(0, (nbytes // 256).bit_length() - 1)))


def data_size(tensors: Mapping[str, TensorSource]) -> int:
    """Total tensor bytes of a checkpoint holding `tensors` (the header not included)."""
    return sum(nbytes_of(*_meta(src)) for src in tensors.values())


class _Sink:
    """Where checkpoint bytes go: subclasses write bytes and copy file spans."""

    def __init__(self, bar):
        self.bar = bar

    def write(self, data, count: bool = True) -> None:
        view = memoryview(data).cast("B")
        for i in range(0, len(view), _CHUNK):
            self._write(view[i : i + _CHUNK])
            if count:
                self.bar.advance(min(_CHUNK, len(view) - i))

    def copy(self, span: FileSpan) -> None:
        pos, left = span.start, span.nbytes
        while left:
            n = self._copy_some(span.fd, pos, min(left, _CHUNK))
            pos += n
            left -= n
            self.bar.advance(n)

    def _copy_some(self, fd_in: int, pos: int, count: int) -> int:
        return self._pread_write(fd_in, pos, count)

    def _pread_write(self, fd_in: int, pos: int, count: int) -> int:
        data = os.pread(fd_in, count, pos)  # at most _CHUNK bytes in memory
        if not data:
            raise N2NError("an input checkpoint became shorter while it was being copied (was it overwritten?)")
        self.write(data, count=False)
        return len(data)

    def _write(self, view: memoryview) -> None:
        raise NotImplementedError


class _FdSink(_Sink):
    """A raw file descriptor: untouched tensors are copied in the kernel when the files allow it."""

    def __init__(self, fd: int, bar):
        super().__init__(bar)
        self.fd = fd
        self._ways = [w for w in ("copy_file_range", "sendfile") if hasattr(os, w)]

    def _write(self, view: memoryview) -> None:
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def _copy_some(self, fd_in: int, pos: int, count: int) -> int:
        while self._ways:
            try:
                if self._ways[0] == "copy_file_range":
                    n = os.copy_file_range(fd_in, self.fd, count, pos)
                else:
                    n = os.sendfile(self.fd, fd_in, pos, count)
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise
                n = 0
            if n > 0:
                return n
            # Unsupported for these two files (or a file system that reports 0): next way.
            self._ways.pop(0)
        return self._pread_write(fd_in, pos, count)


class _StreamSink(_Sink):
    """A Python binary stream without a usable descriptor (e.g. a test runner's stdout)."""

    def __init__(self, stream, bar):
        super().__init__(bar)
        self.stream = stream

    def _write(self, view: memoryview) -> None:
        self.stream.write(view)


def stream_checkpoint(sink: _Sink, tensors: Mapping[str, TensorSource], metadata: Mapping[str, str]) -> None:
    """Write one safetensors file to `sink`: the header, then each tensor's bytes in header order."""
    head, order = build_header(tensors, metadata)
    sink.write(head, count=False)
    for k in order:
        src = tensors[k]
        expected = nbytes_of(*_meta(src))
        span = src.span if isinstance(src, LazyTensor) else None
        if span is not None:
            if span.nbytes != expected:  # a bug, never a bad file: the header was validated
                raise RuntimeError(f"tensor {k!r}: input span of {span.nbytes} bytes, header promised {expected}")
            sink.copy(span)
            continue
        data = _bytes_of(src)
        if len(data) != expected:  # a lazy source lied about its shape: a bug, never a bad file
            raise RuntimeError(f"tensor {k!r}: {len(data)} bytes, header promised {expected}")
        sink.write(data)
        del data  # drop a computed tensor before fetching the next one


def fd_sink(fd: int, bar) -> _Sink:
    """A sink writing at the current offset of file descriptor `fd` (see :func:`stream_checkpoint`)."""
    return _FdSink(fd, bar)


def stdout_fd() -> Optional[int]:
    """The descriptor a checkpoint written to ``-`` goes to; None when standard output is a
    Python stream without one (a test runner's capture).

    Raises:
        N2NError: standard output is closed (``>&-``): nothing could receive the checkpoint.
    """
    if sys.stdout is None:  # Python sets it to None when descriptor 1 was closed at start-up
        raise N2NError("cannot write to standard output: it is closed; redirect it (-o - > file) or give -o FILE")
    try:
        return sys.stdout.buffer.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return None


def _stdout_sink(bar) -> _Sink:
    fd = stdout_fd()
    out = sys.stdout.buffer
    out.flush()  # anything already buffered goes first; then we write to the descriptor directly
    return _StreamSink(out, bar) if fd is None else _FdSink(fd, bar)


def _label(path: str) -> str:
    return "<stdout>" if path == STDIN else os.path.basename(path)


# How an existing output path is written (see output_target).
NEW, REPLACE, STREAM = "new", "replace", "stream"


def output_target(dest: str) -> tuple:
    """Where a checkpoint for `dest` goes, and how: ``(kind, path)``.

    * ``NEW`` or ``REPLACE``: a regular file (or nothing yet) at `path`, written atomically (a
      temporary file beside it, renamed over it). A symbolic link is followed: `path` is its
      final target, so the link stays a link and its target gets the new content.
    * ``STREAM``: a character device (``/dev/null``) or a FIFO, written through like ``-o -``:
      renaming a file over it would replace the device or pipe and nobody would get the data.

    Raises:
        N2NError: `dest` is a folder, a block device, a socket, a dangling link, or its
            folder does not exist.
    """
    try:
        st = os.stat(dest)  # follows links, as writing through `> dest` in a shell does
    except FileNotFoundError:
        if os.path.islink(dest):
            raise N2NError(f"{dest}: is a symbolic link to {os.readlink(dest)}, which does not exist; "
                           "give the target's path, or remove the link") from None
        st = None
    except OSError as e:
        raise N2NError(f"{dest}: cannot write there ({e.strerror})") from None
    if st is None or stat.S_ISREG(st.st_mode):
        path = os.path.realpath(dest) if os.path.islink(dest) else dest
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise N2NError(f"{dest}: the output folder {folder} does not exist")
        return (NEW if st is None else REPLACE), path
    if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return STREAM, dest
    if stat.S_ISDIR(st.st_mode):
        raise N2NError(f"{dest}: is a folder; give a file name for the output checkpoint")
    raise N2NError(f"{dest}: is a {_file_kind(st.st_mode)}, which n2n does not write to; "
                   "give a regular file, a FIFO, a character device such as /dev/null, or -o -")


def _file_kind(mode: int) -> str:
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def write_checkpoint(dest: str, tensors: Mapping[str, TensorSource], metadata: Mapping[str, str],
                     mode: Optional[int] = None) -> None:
    """Write a safetensors file atomically; ``-`` writes to standard output.

    Streams (see the notes above :class:`FileSpan`): memory holds at most one computed tensor,
    whatever the checkpoint's size. A file is first written to a temporary file in the
    destination folder and renamed over `dest` only once complete, so a failure at any point
    leaves no partial output behind. A symbolic link is followed (its target is replaced); a
    FIFO or a character device is written through, like standard output (see
    :func:`output_target`).

    Permissions: a file replaced keeps its mode; a new one gets `mode` minus the umask, as
    ``cp`` gives a copy its source's mode (so a private input gives a private output).

    Durability: when `dest` already exists (a rerun, ``--overwrite-input``), the new file is
    synced to disk before the rename, so not even a power cut can lose the previous file. A new
    file is not synced, as ``cp``, ``torch.save`` and safetensors' ``save_file`` do not: a power
    cut could then lose only the new output, which a rerun restores, and the sync would cost
    about as much as the whole copy (0.4 s per GiB on the development machine).

    Args:
        dest: output file, or ``-`` for standard output (refused when it is a terminal).
        tensors: name -> tensor or :class:`LazyTensor`.
        metadata: string -> string; written with sorted keys, so the bytes are deterministic.
        mode: permission bits of the input (see :func:`new_file_mode`); None: 0o666.

    Raises:
        N2NError: standard output is a terminal or closed, or the destination cannot be written.

    Example:
        >>> write_checkpoint("out.safetensors", {"w": torch.ones(2)}, {"format": "pt"})
    """
    if dest == STDIN:
        _write_stdout(tensors, metadata)
        return
    kind, path = output_target(dest)
    if kind == STREAM:
        _write_through(dest, tensors, metadata)
        return
    _write_atomically(dest, path, tensors, metadata, mode)


def _write_stdout(tensors, metadata) -> None:
    stdout_fd()  # refuses a closed standard output
    if sys.stdout.isatty():
        raise N2NError("refusing to write a binary checkpoint to a terminal: redirect it (-o - > file, or | n2n ...) or give -o FILE")
    try:
        with progress.task(f"writing {_label(STDIN)}", data_size(tensors)) as bar:
            stream_checkpoint(_stdout_sink(bar), tensors, metadata)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        raise  # the reader went away (`| head`): the command layer exits quietly
    except OSError as e:  # a full disk behind `> file`, /dev/full, a closed descriptor
        raise N2NError(f"cannot write to standard output: {e.strerror or e}") from None


def _write_through(dest: str, tensors, metadata) -> None:
    """Stream into a FIFO or character device: opened for writing, never created or renamed over."""
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_NOCTTY)  # a FIFO blocks here until a reader opens it
    except OSError as e:
        raise N2NError(f"{dest}: cannot write there ({e.strerror})") from None
    try:
        if os.isatty(fd):
            raise N2NError(f"{dest}: is a terminal; refusing to write a binary checkpoint to it")
        with progress.task(f"writing {_label(dest)}", data_size(tensors)) as bar:
            stream_checkpoint(_FdSink(fd, bar), tensors, metadata)
    except OSError as e:
        raise N2NError(f"{dest}: write failed ({e.strerror})") from None
    finally:
        os.close(fd)


def _write_atomically(dest: str, path: str, tensors, metadata, mode: Optional[int]) -> None:
    """Write `path` (the regular file `dest` names) via a temporary file renamed over it."""
    folder = os.path.dirname(os.path.abspath(path))
    old = _regular_file_mode(path)  # None: nothing there yet
    tmp = TempPath(folder, os.path.basename(path), ".tmp")
    try:
        try:
            fd = tmp.create_file()
        except OSError as e:
            raise N2NError(f"{dest}: cannot write in {folder} ({e.strerror})") from None
        try:
            with progress.task(f"writing {_label(dest)}", data_size(tensors)) as bar:
                stream_checkpoint(_FdSink(fd, bar), tensors, metadata)
            # Created 0600: a replaced file keeps its mode, a new one gets the input's.
            os.fchmod(fd, old if old is not None else new_file_mode(mode))
            if old is not None:
                os.fsync(fd)
        finally:
            os.close(fd)
        _check_rename_target(dest, path)
        os.replace(tmp.path, path)
    except BaseException as e:
        tmp.remove()
        if isinstance(e, OSError):
            raise N2NError(f"{dest}: write failed ({e.strerror})") from None
        raise


class TempPath:
    """A temporary file or folder beside an output, named so that it can always be removed.

    ``tempfile.mkstemp`` creates the file and only then returns its name: an interrupt (Ctrl-C,
    SIGTERM) landing in between leaves a file nobody knows about. Here the name is recorded
    before the file is created, so :meth:`remove` after any interrupt finds it. Names are
    ``.NAME.XXXXXXXX.tmp`` where that fits the file system's name limit, else ``.n2n-XXXXXXXX.tmp``
    (see :func:`temp_prefix`).
    """

    def __init__(self, folder: str, name: str, suffix: str):
        self.folder = folder
        self.prefix = temp_prefix(folder, name, suffix)
        self.suffix = suffix
        self.path: Optional[str] = None  # set before each attempt to create it
        self.is_dir = False

    def create_file(self) -> int:
        """Create the file (mode 0600, exclusively) and return its descriptor."""
        return self._create(lambda p: os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600))

    def create_dir(self) -> str:
        """Create the folder (mode 0700, exclusively) and return its path."""
        self.is_dir = True
        self._create(lambda p: os.mkdir(p, 0o700))
        return self.path

    def _create(self, make):
        for _ in range(100):
            self.path = os.path.join(self.folder, f"{self.prefix}{secrets.token_hex(4)}{self.suffix}")
            try:
                return make(self.path)
            except FileExistsError:  # another run's: try another name, never remove that one
                self.path = None
        raise N2NError(f"{self.folder}: cannot create a temporary file there (every name tried exists)")

    def remove(self) -> None:
        """Remove what was (or may have been) created; nothing when it is gone already."""
        if self.path is None:
            return
        try:
            if self.is_dir:
                shutil.rmtree(self.path)
            else:
                os.unlink(self.path)
        except OSError:  # gone already, or out of our hands: the original failure matters more
            pass


def _regular_file_mode(path: str) -> Optional[int]:
    """The permission bits of the regular file at `path`; None when there is none."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return stat.S_IMODE(st.st_mode) & 0o777 if stat.S_ISREG(st.st_mode) else None


def _check_rename_target(dest: str, path: str) -> None:
    """Refuse to rename over anything but a regular file, should one have appeared meanwhile."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise N2NError(f"{dest}: changed while the checkpoint was being written (it is no longer a regular file); nothing was written")


def new_file_mode(mode: Optional[int]) -> int:
    """Mode of a new output file: the input's permission bits (`mode`; None: 0o666) minus the
    umask, as ``cp`` does, so a private checkpoint (0600) never gives a world-readable one."""
    return (0o666 if mode is None else mode & 0o777) & ~current_umask()


def temp_prefix(folder: str, name: str, suffix: str) -> str:
    """Prefix of a temporary name beside `name` in `folder`: ``.NAME.`` when that still fits the
    file system's name limit (so a stray one says whose it was), else the short ``.n2n-``.

    A legal 250-byte output name must not be refused because its temporary name is longer.
    """
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    prefix = f".{name}."
    # TempPath adds 8 random characters between prefix and suffix.
    if len(os.fsencode(prefix)) + 8 + len(os.fsencode(suffix)) <= name_max:
        return prefix
    return ".n2n-"


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
