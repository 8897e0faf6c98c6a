"""Refusals that protect the user before any work is done.

Three things can go wrong long before a surgery's exactness is in question, and each one is
cheaper to refuse up front than to discover at the end:

* **Memory.** ``--width 1000000000000`` would ask the allocator for terabytes; the process would
  die (or the machine would swap) instead of saying why. :func:`check_allocation` (in
  :mod:`n2nsurgery.memory`, re-exported here) compares an estimate of what a step will hold in
  memory with what the machine has available and refuses with the figure.
* **NaN and Inf.** A checkpoint whose parameters hold NaN computes NaN, and NaN = NaN passes
  any comparison that treats matching NaNs as equal: a "verified" surgery would prove nothing.
  :func:`check_finite` refuses such checkpoints unless the user opts in (``--allow-nonfinite``).
* **Losing the input, or the user's files.** ``-o`` naming the input file would replace the
  teacher (atomically, but it would be gone). :func:`check_output` refuses that unless the user
  says so (``--overwrite-input``), refuses ``-o -`` when standard output is closed or is an
  input file (``>> input``), and refuses, before the work starts, a missing output folder and
  an output n2n must not write (a block device, a dangling link, a folder of other files).
"""

from __future__ import annotations

import os
import stat
from typing import Iterable

import torch

from .checkpoint import output_target, stdout_fd
from .errors import N2NError
from .memory import MAX_ELEMENTS, available_memory, check_allocation, format_bytes, tensor_bytes  # noqa: F401  (re-exported)
from .shards import check_destination

# Elements checked at once by check_finite: bounds the temporary boolean mask (16 MiB).
_FINITE_CHUNK = 1 << 24


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
        chunk = flat[start : start + _FINITE_CHUNK]
        if chunk.dtype.itemsize == 1:  # float8: torch has no isfinite for it; float32 holds every value
            chunk = chunk.float()
        bad += int((~torch.isfinite(chunk)).sum())
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
    """Refuse, before any work, an output that names an input (unless `overwrite_input`), whose
    folder is missing, or that cannot be written as asked.

    Args:
        output: the ``-o`` value; ``-`` is standard output, refused when it is closed or is
            (``>> input``) an input file: `overwrite_input` does not apply to a stream, which
            would append to the input rather than replace it.
        inputs: paths the command read (see :func:`input_paths`).
        overwrite_input: the user asked for it (``--overwrite-input``): the input is then replaced
            atomically, once the new checkpoint is complete.
        folder: the output is a folder (a sharded checkpoint).

    Raises:
        N2NError: the output is an input, its parent folder does not exist, or it is something
            n2n does not write (a folder of the user's files, a block device, a dangling link).
    """
    inputs = list(inputs)
    if output == "-":
        _check_stdout(inputs, folder)
        return
    for src in inputs:
        if _same_file(src, output) or (folder and os.path.isdir(output) and _inside(src, output)):
            if overwrite_input:
                break
            raise N2NError(
                f"{output}: is the input {src}, and writing there would destroy it; give another -o, or pass "
                "--overwrite-input to replace it (atomically, once the new checkpoint is complete)"
            )
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise N2NError(f"{output}: the output folder {parent} does not exist; create it first (mkdir -p {parent})")
    if folder:
        check_destination(output)
    else:
        output_target(output)


def _check_stdout(inputs: list, folder: bool) -> None:
    """``-o -``: standard output must be open, and must not be one of the input files."""
    if folder:
        check_destination("-")  # refuses: a sharded checkpoint is a folder
    fd = stdout_fd()
    if fd is None:  # a Python stream (a test runner's capture): no file to compare
        return
    try:
        out = os.fstat(fd)
    except OSError as e:
        raise N2NError(f"cannot write to standard output: {e.strerror}; redirect it (-o - > file) or give -o FILE") from None
    if not stat.S_ISREG(out.st_mode):
        return
    for src in inputs:
        try:
            st = os.stat(src)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino):
            raise N2NError(
                f"standard output is the input {src} (-o - > or >> an input), and writing there would destroy it; "
                "redirect to another file, or give -o FILE (with --overwrite-input to replace the input)"
            )


def _inside(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([os.path.realpath(path), os.path.realpath(folder)]) == os.path.realpath(folder)
    except ValueError:
        return False
