"""Prove that two models compute the same function on random probes (docs/commands.md#verify).

Both models see the same probes: standard normal for float inputs, uniform integers in
``[0, high)`` for integer inputs, drawn on the CPU from ``seed`` so every device sees the same
numbers. They pass when, for every output, ``max|y_B - y_A| <= atol + rtol * max|y_A|``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from . import progress
from .errors import N2NError
from .executor import compute_dtype, resolve_device, run
from .ops import get_op

# (atol, rtol) by the least precise floating dtype among the checkpoint's parameters.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-3, 5e-3),
    torch.bfloat16: (1e-2, 3e-2),
}
_PRECISION_ORDER = [torch.bfloat16, torch.float16, torch.float32, torch.float64]

PROBE_CHUNK = 64  # probes run through the models at once; bounds activation memory


def default_tolerance(*models) -> tuple:
    dtypes = set()
    for m in models:
        dtypes |= m.float_dtypes()
    for dt in _PRECISION_ORDER:
        if dt in dtypes:
            return TOLERANCES[dt]
    return TOLERANCES[torch.float32]


@dataclass
class OutputCheck:
    name: str  # output node in model A
    name_b: str  # output node in model B
    shape: list  # one-sample shape
    max_abs: float
    max_rel: float  # max_abs / max|y_A|
    bound: float  # atol + rtol * max|y_A|
    passed: bool


@dataclass
class VerifyResult:
    passed: bool
    outputs: list
    device: str
    probes: int
    seed: int
    atol: float
    rtol: float

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)


def _param_bytes(model) -> int:
    """Bytes of the parameters `model` reads per run: what decides whether a progress bar shows."""
    keys = {node.param_key(r) for node in model.arch.nodes for r in get_op(node.op).params}
    return sum(math.prod(model.tensors.shape(k)) * model.tensors.dtype(k).itemsize for k in keys if k in model.tensors)


def make_probes(arch, n: int, seed: int) -> dict:
    """`n` random samples for every input of `arch`, from `seed`, on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, spec in arch.inputs.items():
        shape = (n,) + tuple(spec.shape)
        if spec.high is not None:
            out[name] = torch.randint(0, spec.high, shape, generator=gen, dtype=getattr(torch, spec.dtype))
        else:
            dt = torch.float64 if spec.dtype == "float64" else torch.float32
            out[name] = torch.randn(shape, generator=gen, dtype=dt)
    return out


def _check_memory(a, b, probes: int) -> None:
    """Refuse before allocating when the probes, or one chunk of probes through the widest value
    of either model, cannot fit in memory (a typo in --probes or in an input shape)."""
    from .guards import check_allocation

    per_sample = sum(math.prod(spec.shape) for spec in a.arch.inputs.values())
    chunk = min(probes, PROBE_CHUNK)
    name, widest = max(((n, math.prod(s)) for m in (a, b) for n, s in m.shapes.items()), key=lambda t: t[1])
    nbytes = 8 * (probes * per_sample + 2 * chunk * widest)  # float64 at worst; a value and its producer's input
    check_allocation(
        nbytes,
        f"running the models on {probes} probes (the widest value, {name!r}, holds {widest} numbers per sample)",
        "use fewer --probes, or check the architecture's shapes",
        elements=max(probes * per_sample, chunk * widest),
    )


def _same_inputs(a, b) -> None:
    ia = {k: (tuple(v.shape), v.dtype, v.high) for k, v in a.arch.inputs.items()}
    ib = {k: (tuple(v.shape), v.dtype, v.high) for k, v in b.arch.inputs.items()}
    if ia != ib:
        fa = ", ".join(f"{k} {list(s)} {d}" for k, (s, d, _) in ia.items())
        fb = ", ".join(f"{k} {list(s)} {d}" for k, (s, d, _) in ib.items())
        raise N2NError(f"the models take different inputs ({a.source}: {fa}; {b.source}: {fb}), so they cannot be compared")
    if len(a.arch.outputs) != len(b.arch.outputs):
        raise N2NError(
            f"the models have different numbers of outputs ({a.source}: {len(a.arch.outputs)}, {b.source}: {len(b.arch.outputs)})"
        )


def compare_outputs(a, b, ya: list, yb: list, atol: float, rtol: float) -> list:
    checks = []
    for name_a, name_b, ta, tb in zip(a.arch.outputs, b.arch.outputs, ya, yb):
        shape = list(ta.shape[1:])
        if ta.shape != tb.shape:
            checks.append(OutputCheck(name_a, name_b, shape, math.inf, math.inf, 0.0, False))
            continue
        ta64, tb64 = ta.double(), tb.double()
        nan_a, nan_b = torch.isnan(ta64), torch.isnan(tb64)
        if not torch.equal(nan_a, nan_b):  # NaN where the other has a number: they differ
            checks.append(OutputCheck(name_a, name_b, shape, math.inf, math.inf, 0.0, False))
            continue
        ok = ~nan_a
        diff = (tb64 - ta64)[ok].abs()
        # inf - inf is nan: equal infinities are equal, anything else involving inf is not
        both_inf = torch.isinf(ta64[ok]) & (ta64[ok] == tb64[ok])
        diff = torch.where(both_inf, torch.zeros_like(diff), diff)
        diff = torch.nan_to_num(diff, nan=math.inf)
        max_abs = float(diff.max()) if diff.numel() else 0.0
        finite_a = ta64[ok][torch.isfinite(ta64[ok])]
        scale = float(finite_a.abs().max()) if finite_a.numel() else 0.0
        bound = atol + rtol * scale
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
        checks.append(OutputCheck(name_a, name_b, shape, max_abs, max_rel, bound, max_abs <= bound))
    return checks


def verify(a, b, probes: int = 64, seed: int = 0, atol: Optional[float] = None, rtol: Optional[float] = None, device: str = "auto") -> VerifyResult:
    """Run `a` and `b` on the same random probes and compare every output.

    Args:
        a, b: :class:`~n2nsurgery.model.Model` (e.g. teacher and student).
        probes: samples per input.
        seed: seed of the probe generator.
        atol, rtol: tolerance; default by the checkpoints' dtype (:data:`TOLERANCES`).
        device: ``auto`` (the GPU when present), ``cpu`` or ``cuda``.

    Returns:
        A :class:`VerifyResult`; ``passed`` says whether every output is within tolerance.

    Raises:
        N2NError: the models take different inputs, or a bad argument.
    """
    if probes < 1:
        raise N2NError(f"--probes must be at least 1, got {probes}")
    _same_inputs(a, b)
    _check_memory(a, b, probes)
    dev = resolve_device(device)
    d_atol, d_rtol = default_tolerance(a, b)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    if not (0 <= atol < math.inf and 0 <= rtol < math.inf):  # also catches NaN
        raise N2NError(f"--atol and --rtol must be finite and not negative, got atol={atol}, rtol={rtol}")
    dtype = max(compute_dtype(a), compute_dtype(b), key=lambda d: torch.finfo(d).bits)
    inputs = make_probes(a.arch, probes, seed)
    ya, yb = [], []
    starts = range(0, probes, PROBE_CHUNK)
    steps = len(starts) * (len(a.arch.nodes) + len(b.arch.nodes))
    with progress.task("verifying", steps, unit="nodes", size=len(starts) * (_param_bytes(a) + _param_bytes(b))) as bar:
        for start in starts:
            chunk = {k: v[start : start + PROBE_CHUNK] for k, v in inputs.items()}
            ya.append([t.cpu() for t in run(a, chunk, dev, dtype, on_node=bar.advance)])
            yb.append([t.cpu() for t in run(b, chunk, dev, dtype, on_node=bar.advance)])
    ya = [torch.cat(parts) for parts in zip(*ya)]
    yb = [torch.cat(parts) for parts in zip(*yb)]
    checks = compare_outputs(a, b, ya, yb, atol, rtol)
    name = str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})"
    return VerifyResult(all(c.passed for c in checks), checks, name, probes, seed, atol, rtol)
