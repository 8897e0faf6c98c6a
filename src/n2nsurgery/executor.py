"""Run a model: the architecture's nodes in order, in inference mode, in float32 or wider.

Parameters are fetched node by node as the graph runs and each intermediate value is dropped
after its last reader, so memory follows the widest point of the graph, not the whole model.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping

import torch

from .errors import N2NError
from .ops import get_op


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when one is present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise N2NError("--device cuda: no CUDA device is available here; use --device cpu or --device auto")
        return torch.device("cuda")
    raise N2NError(f"--device must be auto, cpu or cuda, got {name!r}")


@contextlib.contextmanager
def exact_math():
    """Inference mode with TF32 and reduced-precision reductions off, restored afterwards."""
    cuda_mm = torch.backends.cuda.matmul
    saved = (
        cuda_mm.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        cuda_mm.allow_fp16_reduced_precision_reduction,
        cuda_mm.allow_bf16_reduced_precision_reduction,
        torch.get_float32_matmul_precision(),
    )
    try:
        cuda_mm.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        cuda_mm.allow_fp16_reduced_precision_reduction = False
        cuda_mm.allow_bf16_reduced_precision_reduction = False
        torch.set_float32_matmul_precision("highest")
        with torch.inference_mode():
            yield
    finally:
        (
            cuda_mm.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            cuda_mm.allow_fp16_reduced_precision_reduction,
            cuda_mm.allow_bf16_reduced_precision_reduction,
            precision,
        ) = saved
        torch.set_float32_matmul_precision(precision)


def compute_dtype(model) -> torch.dtype:
    """float64 when the model holds float64 parameters or inputs, else float32."""
    wide = torch.float64 in model.float_dtypes() or any(s.dtype == "float64" for s in model.arch.inputs.values())
    return torch.float64 if wide else torch.float32


def run(model, inputs: Mapping[str, torch.Tensor], device="cpu", dtype: torch.dtype | None = None,
        on_node: Callable[[], None] | None = None) -> list:
    """Outputs of `model` (in ``arch.outputs`` order) for batched `inputs`, in inference mode.

    Float inputs and parameters are cast to `dtype` (default: :func:`compute_dtype`); integer
    inputs keep their dtype. Parameters are read and moved to `device` one node at a time and
    dropped after it, so a model larger than the GPU's (or this machine's) memory streams through.
    `on_node` is called after every node (progress bars).
    """
    with exact_math():
        steps = node_values(model, inputs, device, dtype, on_node)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value


def node_values(model, inputs: Mapping[str, torch.Tensor], device="cpu", dtype: torch.dtype | None = None,
                on_node: Callable[[], None] | None = None) -> Iterator[tuple]:
    """Run `model` node by node, yielding ``(name, value)`` as each node's value is computed.

    The generator's return value (``StopIteration.value``) is the list of outputs, as
    :func:`run` returns it. It enters no context itself, so the caller must hold
    :func:`exact_math` around the whole iteration: two of these generators can then run in
    lockstep (verification compares intermediate values of two models as they appear) without
    one restoring the other's global modes halfway. A value yielded is still referenced by the
    graph until its last reader, so the caller must not modify it.
    """
    device = torch.device(device)
    dtype = dtype or compute_dtype(model)
    arch = model.arch
    last_use = {}
    for i, node in enumerate(arch.nodes):
        for src in node.inputs:
            last_use[src] = i
    keep = set(arch.outputs)

    def prep(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

    values = {name: prep(inputs[name]) for name in arch.inputs}
    for i, node in enumerate(arch.nodes):
        op = get_op(node.op)
        with contextlib.ExitStack() as held:
            params = {}
            for role in op.params:
                key = node.param_key(role)
                # Read in place (no copy) for the length of this node: forward only reads them.
                params[role] = prep(held.enter_context(model.tensors.mapped(key))) if key in model.tensors else None
            try:
                values[node.name] = op.forward([values[s] for s in node.inputs], params, node.resolved_attrs())
            except RuntimeError as e:  # shapes were checked, so this is a device or memory problem
                raise N2NError(f"node {node.name!r} ({node.op}) failed on {device}: {str(e).splitlines()[0]}") from None
            del params
        if on_node is not None:
            on_node()
        # Yielded outside the parameter mapping: the caller may hold us here for a while.
        yield node.name, values[node.name]
        for src in set(node.inputs):
            if last_use.get(src) == i and src not in keep:
                values.pop(src, None)
    return [values[o] for o in arch.outputs]
