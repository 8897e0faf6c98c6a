"""Prove that two models compute the same function on random probes (docs/commands.md#verify).

Both models see the same probes: standard normal for float inputs, uniform integers in
``[0, high)`` for integer inputs, drawn on the CPU from ``seed`` so every device sees the same
numbers. They pass when, for every output, ``max|y_B - y_A| <= atol + rtol * max|y_A|``, and
every value is finite: NaN or Inf anywhere in an output is never "equal", even at the same place
in both models (nothing finite was compared there).

Intermediate values are compared too, on the same probes and with the same rule: every node whose
name exists in both graphs with the same one-sample shape (a widened layer's output changes shape
and is skipped; a node a deepening added exists in one graph only). A wrong remap can hide in the
outputs (doubling one input column of a consumer moved an EfficientNet's output by 3.9e-5 while
the consumer's own value moved by 0.33); right after the mistake it cannot. The two models run in
lockstep, node by node, so an intermediate is held only until the other model produces it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from . import progress
from .errors import N2NError
from .executor import compute_dtype, exact_math, node_values, resolve_device, run
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

# Intermediates one model produced and the other has not yet (their topological orders differ
# after a deepening) wait in memory up to this many bytes; beyond it a value is not compared
# (counted in IntermediateSummary.skipped_memory) rather than held.
PENDING_BYTES = 1 << 30


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
    # NaN/Inf values over all probes, in A and in B, and the values compared per model. Any
    # non-finite value fails the output: nothing finite was compared there.
    nonfinite_a: int = 0
    nonfinite_b: int = 0
    numel: int = 0


@dataclass
class IntermediateCheck:
    """One intermediate value (a node kept by the surgery: same name, same shape in both)."""

    name: str
    shape: list  # one-sample shape
    max_abs: float
    max_rel: float  # max_abs / max|v_A|
    bound: float  # atol + rtol * max|v_A|, as for outputs
    passed: bool


@dataclass
class IntermediateSummary:
    """How the values inside the models compared: counts, and the worst one."""

    compared: int  # values compared (node names in both graphs with the same shape, outputs aside)
    failed: int  # of those, beyond tolerance (or not finite in B where A is finite)
    skipped_shape: int  # shared names whose shape differs (a widened layer and its coupled nodes)
    skipped_nonfinite: int  # A's value holds NaN/Inf, so it cannot serve as a reference
    skipped_memory: int  # waited too long for the other model (PENDING_BYTES)
    worst: Optional[IntermediateCheck]  # highest max_abs / bound; None when nothing was compared
    failures: list  # names of the failed values, in A's node order (at most 20)


@dataclass
class VerifyResult:
    passed: bool
    outputs: list
    device: str
    probes: int
    seed: int
    atol: float
    rtol: float
    intermediates: Optional[IntermediateSummary] = None  # None: outputs only (--outputs-only)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def nonfinite_outputs(self) -> list:
        """The outputs that hold NaN or Inf in A or B."""
        return [o for o in self.outputs if o.nonfinite_a or o.nonfinite_b]

    def describe_failure(self, a: str = "A", b: str = "B") -> Optional[str]:
        """One line naming what failed, worst first (None when the result passed); `a` and `b`
        are how the models are called (``"the teacher"``, ``"the student"``).

        Example: ``output 'fc' is not finite on the probes: 640 of 640 values are NaN or Inf in A
        and 640 in B; NaN or Inf never compares equal``.
        """
        if self.passed:
            return None
        for o in self.nonfinite_outputs:
            return (f"output {o.name!r} is not finite on the probes: {o.nonfinite_a} of {o.numel} values are NaN or Inf "
                    f"in {a} and {o.nonfinite_b} in {b}; NaN or Inf never compares equal")
        failed = [o for o in self.outputs if not o.passed]
        if failed:
            worst = max(failed, key=_excess)
            return f"output {worst.name!r} differs by {worst.max_abs:.3g} (allowed {worst.bound:.3g})"
        w = self.intermediates.worst
        return (f"the outputs agree, but the value of node {w.name!r} inside the models differs by {w.max_abs:.3g} "
                f"(allowed {w.bound:.3g})")

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)


def _excess(check) -> float:
    """How far a check is from its bound (> 1: failed); ranks the worst output or value."""
    return check.max_abs / check.bound if check.bound else (0.0 if check.max_abs == 0 else math.inf)


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
    """One :class:`OutputCheck` per output pair. Differences are taken where both values are
    finite; any NaN or Inf, in A or B, fails the output."""
    checks = []
    for name_a, name_b, ta, tb in zip(a.arch.outputs, b.arch.outputs, ya, yb):
        shape = list(ta.shape[1:])
        if ta.shape != tb.shape:
            checks.append(OutputCheck(name_a, name_b, shape, math.inf, math.inf, 0.0, False, numel=ta.numel()))
            continue
        ta64, tb64 = ta.double(), tb.double()
        fin_a, fin_b = torch.isfinite(ta64), torch.isfinite(tb64)
        bad_a, bad_b = int((~fin_a).sum()), int((~fin_b).sum())
        both = fin_a & fin_b
        diff = (tb64 - ta64)[both].abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        if bool((fin_a & ~fin_b).any()):  # B lost a value A has
            max_abs = math.inf
        finite_a = ta64[fin_a]
        scale = float(finite_a.abs().max()) if finite_a.numel() else 0.0
        bound = atol + rtol * scale
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
        passed = max_abs <= bound and bad_a == 0 and bad_b == 0
        checks.append(OutputCheck(name_a, name_b, shape, max_abs, max_rel, bound, passed, bad_a, bad_b, ta.numel()))
    return checks


class _Intermediates:
    """Running comparison of the values both models compute under the same node name.

    Figures accumulate over probe chunks; a value is compared as soon as both models have
    produced it and then dropped, so at most the values one model is ahead by are held.
    """

    def __init__(self, a, b, atol: float, rtol: float, renames: Optional[dict] = None):
        # `renames`: A's name -> B's for nodes a surgery renamed (a deepening renumbers the blocks
        # after the new one); values are tracked under A's names.
        renames = renames or {}
        outputs_a, outputs_b = set(a.arch.outputs), set(b.arch.outputs)  # compared as outputs already
        names_b = {n.name for n in b.arch.nodes}
        common = [n.name for n in a.arch.nodes
                  if renames.get(n.name, n.name) in names_b and n.name not in outputs_a
                  and renames.get(n.name, n.name) not in outputs_b]
        self.names = {n for n in common if tuple(a.shapes[n]) == tuple(b.shapes[renames.get(n, n)])}
        self.order = [n for n in common if n in self.names]
        self.name_in_a = {renames.get(n, n): n for n in self.names}  # B's name -> A's
        self.skipped_shape = len(common) - len(self.names)
        self.atol, self.rtol = atol, rtol
        self.max_abs = {}
        self.scale = {}
        self.nonfinite = set()  # A's value was not finite: no reference
        self.too_late = set()  # not held, over PENDING_BYTES

    def compare(self, name: str, va: torch.Tensor, vb: torch.Tensor) -> None:
        if name in self.nonfinite:
            return
        # In the compute dtype, not float64: no copies of a wide value, and the difference of two
        # close floats is exact (Sterbenz), so only far-apart values round, far beyond any bound.
        # Two passes: NaN and Inf propagate into a max, so a finite max|v_A| means A is finite,
        # and then a finite max|v_B - v_A| means B is too.
        if va.numel() == 0:
            diff, scale = 0.0, 0.0
        else:
            scale = _max_abs(va)
            if not math.isfinite(scale):
                self.nonfinite.add(name)
                return
            diff = _max_abs(vb - va)
            diff = diff if math.isfinite(diff) else math.inf
        self.max_abs[name] = max(self.max_abs.get(name, 0.0), diff)
        self.scale[name] = max(self.scale.get(name, 0.0), scale)

    def summary(self, shapes: dict) -> IntermediateSummary:
        checks = []
        for name in self.order:
            if name in self.nonfinite or name in self.too_late or name not in self.max_abs:
                continue
            max_abs, scale = self.max_abs[name], self.scale[name]
            bound = self.atol + self.rtol * scale
            max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
            checks.append(IntermediateCheck(name, list(shapes[name]), max_abs, max_rel, bound, max_abs <= bound))
        failed = [c.name for c in checks if not c.passed]
        return IntermediateSummary(
            compared=len(checks),
            failed=len(failed),
            skipped_shape=self.skipped_shape,
            skipped_nonfinite=len(self.nonfinite),
            skipped_memory=len(self.too_late - self.nonfinite),
            worst=max(checks, key=_excess) if checks else None,
            failures=failed[:20],
        )


def _max_abs(t: torch.Tensor) -> float:
    """max |t| in one pass without a temporary; NaN when `t` holds a NaN."""
    if not t.is_floating_point():
        return float(t.abs().max())
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi)) if not (bool(torch.isnan(lo)) or bool(torch.isnan(hi))) else math.nan


def _run_lockstep(a, b, chunk: dict, device, dtype, tracker: _Intermediates, on_node) -> tuple:
    """Run `a` and `b` on `chunk` side by side, comparing each shared value when both have it.

    The model that is behind is stepped first, so a value waits only while the other model
    computes the nodes it lacks (a deepening's new layer). Returns both models' outputs.
    """
    runs = {"a": node_values(a, chunk, device, dtype, on_node), "b": node_values(b, chunk, device, dtype, on_node)}
    pending = {"a": {}, "b": {}}  # values one model produced that the other has not yet
    outputs = {}
    held = 0
    with exact_math():
        while len(outputs) < 2:
            side = _next_side(pending, outputs)
            other = "b" if side == "a" else "a"
            try:
                name, value = next(runs[side])
            except StopIteration as done:
                outputs[side] = done.value
                continue
            name = tracker.name_in_a.get(name) if side == "b" else name  # B's values under A's names
            if name not in tracker.names:
                continue
            if name in pending[other]:
                theirs = pending[other].pop(name)
                held -= _nbytes(theirs)
                va, vb = (value, theirs) if side == "a" else (theirs, value)
                tracker.compare(name, va, vb)
            elif held + _nbytes(value) <= PENDING_BYTES:
                pending[side][name] = value
                held += _nbytes(value)
            else:
                tracker.too_late.add(name)
    return outputs["a"], outputs["b"]


def _next_side(pending: dict, done: dict) -> str:
    """Which model to step next: the one the other is waiting for, else A, else whichever is left."""
    if pending["a"] and "b" not in done:
        return "b"
    if pending["b"] and "a" not in done:
        return "a"
    return "a" if "a" not in done else "b"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def verify(a, b, probes: int = 64, seed: int = 0, atol: Optional[float] = None, rtol: Optional[float] = None,
           device: str = "auto", intermediates: bool = True, renames: Optional[dict] = None) -> VerifyResult:
    """Run `a` and `b` on the same random probes and compare every output, and every value inside.

    Args:
        a, b: :class:`~n2nsurgery.model.Model` (e.g. teacher and student).
        probes: samples per input.
        seed: seed of the probe generator.
        atol, rtol: tolerance; default by the checkpoints' dtype (:data:`TOLERANCES`).
        device: ``auto`` (the GPU when present), ``cpu`` or ``cuda``.
        intermediates: also compare every node value whose name and shape both models share
            (``False``: the outputs only, ``n2n verify --outputs-only``).
        renames: node names of `a` -> names of the same nodes in `b`, where a surgery renamed
            them (a block deepening renumbers later blocks); None: values match by name.

    Returns:
        A :class:`VerifyResult`; ``passed`` says whether every output (and every shared value)
        is finite and within tolerance. ``intermediates`` summarises the values inside.

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
    tracker = _Intermediates(a, b, atol, rtol, renames) if intermediates else None
    with progress.task("verifying", steps, unit="nodes", size=len(starts) * (_param_bytes(a) + _param_bytes(b))) as bar:
        for start in starts:
            chunk = {k: v[start : start + PROBE_CHUNK] for k, v in inputs.items()}
            if tracker is not None:
                out_a, out_b = _run_lockstep(a, b, chunk, dev, dtype, tracker, bar.advance)
            else:
                out_a, out_b = run(a, chunk, dev, dtype, on_node=bar.advance), run(b, chunk, dev, dtype, on_node=bar.advance)
            ya.append([t.cpu() for t in out_a])
            yb.append([t.cpu() for t in out_b])
    ya = [torch.cat(parts) for parts in zip(*ya)]
    yb = [torch.cat(parts) for parts in zip(*yb)]
    checks = compare_outputs(a, b, ya, yb, atol, rtol)
    inner = tracker.summary(a.shapes) if tracker is not None else None
    passed = all(c.passed for c in checks) and (inner is None or inner.failed == 0)
    name = str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})"
    return VerifyResult(passed, checks, name, probes, seed, atol, rtol, inner)
