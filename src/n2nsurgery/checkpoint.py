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
import stat
import struct
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional, Union

import torch

from . import progress
from .errors import N2NError
from .inputs import open_input

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


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a checkpoint file, from its header."""

    dtype: torch.dtype
    shape: tuple
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class Checkpoint:
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

    def keys(self) -> list:
        return list(self.infos)

    def __contains__(self, key) -> bool:
        return key in self.infos

    def shape(self, key: str) -> tuple:
        return self.infos[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self.infos[key].dtype

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
            if hasattr(self._buffer, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                start = info.start - info.start % mmap.PAGESIZE
                self._buffer.madvise(mmap.MADV_DONTNEED, start, info.end - start)

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

    Raises:
        N2NError: the file is missing, unreadable, truncated or not a safetensors file.
    """
    if path == STDIN:
        if sys.stdin is None or sys.stdin.isatty():
            raise N2NError("standard input is a terminal: pipe a checkpoint into '-' or give a file path")
        data = _read_all(sys.stdin.buffer, "<stdin>")
        if not data:
            raise N2NError("standard input is empty: the command before '|' wrote no checkpoint (did it fail?)")
        return _parse(data, "<stdin>", len(data))

    if os.path.isdir(path) or path.endswith(".json"):
        from .shards import open_sharded  # a Hugging Face style index and its shards

        return open_sharded(path)

    f = open_input(path, "a safetensors file")
    st = os.fstat(f.fileno())
    if stat.S_ISREG(st.st_mode) and st.st_size > 0:
        # Copy-on-write: pages load on demand and nothing can reach the file on disk. The file
        # stays open (read-only) for kernel-side copies of untouched tensors (see FileSpan).
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            return _parse(buffer, path, st.st_size, f)
        except BaseException:
            f.close()
            raise
    with f:  # a pipe or process substitution: read it all
        buffer = _read_all(f, path)
    return _parse(buffer, path, len(buffer))


def _read_all(f, source: str) -> bytearray:
    """Read a stream to its end in chunks, with a progress bar once it turns out to be large."""
    data = bytearray()
    with progress.task(f"reading {source}", None) as bar:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                return data
            data += chunk
            bar.advance(len(chunk))


def _parse(buffer, source: str, size: int, file=None) -> Checkpoint:
    def bad(msg):
        raise N2NError(f"{source}: {msg}")

    if size < 8:
        bad(f"not a safetensors file (only {size} bytes; truncated or empty)")
    (hlen,) = struct.unpack("<Q", bytes(buffer[:8]))
    if hlen > MAX_HEADER:
        bad(f"not a safetensors file (header length {hlen} is implausible)")
    if 8 + hlen > size:
        bad(f"truncated: the header says {hlen} bytes but the file has only {size - 8} after the length")
    try:
        header = json.loads(bytes(buffer[8 : 8 + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        bad("not a safetensors file (the header is not JSON)")
    if not isinstance(header, dict):
        bad("not a safetensors file (the header is not a JSON object)")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        bad("corrupt header: __metadata__ must map strings to strings")
    for text in [*metadata, *metadata.values(), *header]:
        try:  # JSON can escape lone surrogates ("\udc80"), which no UTF-8 file can hold
            text.encode("utf-8")
        except UnicodeEncodeError:
            bad(f"corrupt header: name or metadata {text[:60]!r} is not valid Unicode (it holds a lone surrogate)")

    data_start = 8 + hlen
    data_len = size - data_start
    infos = {}
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"}:
            bad(f"corrupt header entry for tensor {key!r}")
        code = entry.get("dtype")
        if not isinstance(code, str) or code not in DTYPES:
            bad(f"tensor {key!r} has dtype {code!r}, which this tool does not support")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in shape):
            bad(f"tensor {key!r} has an invalid shape {shape!r}")
        offs = entry.get("data_offsets")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            bad(f"tensor {key!r} has invalid data_offsets {offs!r}")
        dtype = DTYPES[code]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if math.prod(shape) * itemsize != offs[1] - offs[0]:
            bad(f"tensor {key!r}: shape {shape} of {code} needs {math.prod(shape) * itemsize} bytes but data_offsets span {offs[1] - offs[0]}")
        if offs[1] > data_len:
            bad(f"truncated: tensor {key!r} ends at byte {offs[1]} of the data but the file holds only {data_len}")
        infos[key] = TensorInfo(dtype, tuple(shape), data_start + offs[0], data_start + offs[1])
        spans.append((offs[0], offs[1], key))

    spans.sort()
    pos = 0
    for b, e, key in spans:
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


def _stdout_sink(bar) -> _Sink:
    out = sys.stdout.buffer
    out.flush()  # anything already buffered goes first; then we write to the descriptor directly
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return _StreamSink(out, bar)
    return _FdSink(fd, bar)


def _label(path: str) -> str:
    return "<stdout>" if path == STDIN else os.path.basename(path)


def write_checkpoint(dest: str, tensors: Mapping[str, TensorSource], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file atomically; ``-`` writes to standard output.

    Streams (see the notes above :class:`FileSpan`): memory holds at most one computed tensor,
    whatever the checkpoint's size. A file is first written to a temporary file in the
    destination folder and renamed over `dest` only once complete, so a failure at any point
    leaves no partial output behind.

    Durability: when `dest` already exists (a rerun, ``--overwrite-input``), the new file is
    synced to disk before the rename, so not even a power cut can lose the previous file. A new
    file is not synced, as ``cp``, ``torch.save`` and safetensors' ``save_file`` do not: a power
    cut could then lose only the new output, which a rerun restores, and the sync would cost
    about as much as the whole copy (0.4 s per GiB on the development machine).

    Args:
        dest: output file, or ``-`` for standard output (refused when it is a terminal).
        tensors: name -> tensor or :class:`LazyTensor`.
        metadata: string -> string; written with sorted keys, so the bytes are deterministic.

    Raises:
        N2NError: standard output is a terminal, or the destination cannot be written.

    Example:
        >>> write_checkpoint("out.safetensors", {"w": torch.ones(2)}, {"format": "pt"})
    """
    total = data_size(tensors)
    if dest == STDIN:
        if sys.stdout.isatty():
            raise N2NError("refusing to write a binary checkpoint to a terminal: redirect it (-o - > file, or | n2n ...) or give -o FILE")
        with progress.task(f"writing {_label(dest)}", total) as bar:
            stream_checkpoint(_stdout_sink(bar), tensors, metadata)
        sys.stdout.buffer.flush()
        return

    folder = os.path.dirname(os.path.abspath(dest))
    if os.path.isdir(dest):
        raise N2NError(f"{dest}: is a folder; give a file name for the output checkpoint")
    if not os.path.isdir(folder):
        raise N2NError(f"{dest}: the output folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(dest) + ".", suffix=".tmp")
    except OSError as e:
        raise N2NError(f"{dest}: cannot write in {folder} ({e.strerror})") from None
    replacing = os.path.lexists(dest)
    try:
        try:
            with progress.task(f"writing {_label(dest)}", total) as bar:
                stream_checkpoint(_FdSink(fd, bar), tensors, metadata)
            if replacing:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, dest)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise N2NError(f"{dest}: write failed ({e.strerror})") from None
        raise


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
