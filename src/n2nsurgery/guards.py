"""Refusals that protect the user before any work is done.

Three things can go wrong long before a surgery's exactness is in question, and each one is
cheaper to refuse up front than to discover at the end:

* **Memory.** ``--width 1000000000000`` would ask the allocator for terabytes; the process would
  die (or the machine would swap) instead of saying why. :func:`check_allocation` compares an
  estimate of what a step will hold in memory with what the machine has available and refuses
  with the figure.
* **NaN and Inf.** A checkpoint whose parameters hold NaN computes NaN, and NaN = NaN passes
  any comparison that treats matching NaNs as equal: a "verified" surgery would prove nothing.
  :func:`check_finite` refuses such checkpoints unless the user opts in (``--allow-nonfinite``).
* **Losing the input.** ``-o`` naming the input file would replace the teacher (atomically, but
  it would be gone). :func:`check_output` refuses that unless the user says so
  (``--overwrite-input``), and refuses a missing output folder before the work starts.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Optional

import torch

from .errors import N2NError

# Elements checked at once by check_finite: bounds the temporary boolean mask (16 MiB).
_FINITE_CHUNK = 1 << 24


# ------------------------------------------------------------------------------------ memory


def available_memory() -> Optional[int]:
    """Bytes of memory this process can still use: MemAvailable on Linux, else physical memory.

    Returns None where neither is known (then only :data:`MAX_ELEMENTS` applies).
    """
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# No tensor may have more elements than this, whatever the memory: torch indexes with int64,
# and a count this large is a typo, not a model.
MAX_ELEMENTS = 2**48


def format_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KiB'``: binary units, three significant figures."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} PiB"  # pragma: no cover


def tensor_bytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    """Bytes of a tensor of `shape` and `dtype` (Python integers: no overflow for any shape)."""
    return math.prod(int(s) for s in shape) * dtype.itemsize


def check_allocation(nbytes: int, what: str, instead: str, elements: Optional[int] = None) -> None:
    """Refuse when `what` would need more memory than is available, before allocating any of it.

    Args:
        nbytes: the estimate, in bytes, of what the step holds in memory at its peak.
        what: the step, as the start of a sentence (``"widening 'fc1' to 10^12 units"``).
        instead: what would work (``"choose a smaller --width"``).
        elements: the largest single tensor's element count, checked against :data:`MAX_ELEMENTS`.

    Raises:
        N2NError: the estimate exceeds the available memory (or a tensor would be absurdly large).

    Example:
        >>> check_allocation(10**15, "widening 'fc1' to 10^12 units", "choose a smaller --width")
        Traceback (most recent call last):
        n2nsurgery.errors.N2NError: widening 'fc1' to 10^12 units would need about 909 TiB of memory, ...
    """
    limit = available_memory()
    too_many = elements is not None and elements > MAX_ELEMENTS
    if too_many or (limit is not None and nbytes > limit):
        have = f"more than the {format_bytes(limit)} available here" if limit is not None else "more than any machine has"
        raise N2NError(f"{what} would need about {format_bytes(nbytes)} of memory, {have}; {instead}")


# ---------------------------------------------------------------------------------- NaN / Inf


def graph_parameter_keys(model) -> list:
    """Checkpoint keys of every parameter the architecture uses, each once, in node order."""
    from .ops import get_op

    keys = []
    for node in model.arch.nodes:
        for role in get_op(node.op).params:
            key = node.param_key(role)
            if key in model.tensors and key not in keys:
                keys.append(key)
    return keys


def count_nonfinite(t: torch.Tensor) -> int:
    """How many elements of `t` are NaN or ±Inf (0 for integer tensors); chunked, so the
    temporary mask stays small for large tensors."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    flat = t.reshape(-1)
    try:  # fast path, ~30x quicker than isfinite: NaN and ±Inf propagate to the min or the max
        lo, hi = torch.aminmax(flat)
        if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
            return 0
    except (RuntimeError, NotImplementedError):  # dtypes without aminmax (float8): count below
        pass
    bad = 0
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        bad += int((~torch.isfinite(flat[start : start + _FINITE_CHUNK])).sum())
    return bad


def check_finite(model, allow: bool = False) -> None:
    """Refuse a model whose parameters hold NaN or Inf, unless `allow`.

    Raises:
        N2NError: names the checkpoint, the first tensor at fault and how many values are bad.

    Example:
        >>> check_finite(n2n.load_model("recipes/mlp.safetensors", "recipes/mlp.yaml"))  # fine: nothing happens
    """
    if allow:
        return
    for key in graph_parameter_keys(model):
        with model.tensors.mapped(key) as t:  # read in place: no copy of a tensor read once
            bad = count_nonfinite(t)
        if bad:
            raise N2NError(
                f"{model.source}: tensor {key!r} holds {bad} NaN or Inf value{'s' if bad > 1 else ''}, so no comparison "
                "can show the surgery preserves the function; repair the checkpoint, or pass --allow-nonfinite to go ahead anyway"
            )


# ---------------------------------------------------------------------------------- output path


def input_paths(model) -> list:
    """Files (and folders) a model was read from: the checkpoint, its shards, the architecture."""
    paths = [model.source, getattr(model.arch, "source", None)]
    base = getattr(model.tensors, "base", None)
    for shard in (getattr(base, "shards", None) or {}).values():
        paths.append(getattr(shard, "source", None))
    return [p for p in paths if isinstance(p, str) and p not in ("-", "<stdin>")]


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): not the same file
        return False


def check_output(output: str, inputs: Iterable[str], overwrite_input: bool = False, folder: bool = False) -> None:
    """Refuse an output path that names an input (unless `overwrite_input`) or whose folder is missing.

    Args:
        output: the ``-o`` value; ``-`` (standard output) is always fine.
        inputs: paths the command read (see :func:`input_paths`).
        overwrite_input: the user asked for it (``--overwrite-input``): the input is then replaced
            atomically, once the new checkpoint is complete.
        folder: the output is a folder (a sharded checkpoint).

    Raises:
        N2NError: the output is an input, or its parent folder does not exist.
    """
    if output == "-":
        return
    for src in inputs:
        if _same_file(src, output) or (folder and os.path.isdir(output) and _inside(src, output)):
            if overwrite_input:
                return
            raise N2NError(
                f"{output}: is the input {src}, and writing there would destroy it; give another -o, or pass "
                "--overwrite-input to replace it (atomically, once the new checkpoint is complete)"
            )
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise N2NError(f"{output}: the output folder {parent} does not exist; create it first (mkdir -p {parent})")


def _inside(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([os.path.realpath(path), os.path.realpath(folder)]) == os.path.realpath(folder)
    except ValueError:
        return False
