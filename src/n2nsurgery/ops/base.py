"""What an op is: one self-contained definition per op type.

An :class:`OpDef` says, in one place,

* how the op runs (``forward``, torch functional calls on batched tensors),
* which attributes it takes and their defaults (``attrs``), and which parameter roles it reads
  from the checkpoint (``params``),
* how its output shape follows from its input and parameter shapes (``infer_shape``; it also
  rejects parameters whose shapes disagree with the graph),
* what values it can produce given the ranges of its inputs (``value_range``; deepen uses this to
  prove that an identity layer followed by an activation is exact),
* how its units couple and how it is remapped when a widening reaches it (``widen``; see
  :mod:`n2nsurgery.widen`), whether it has units of its own (``units``: axis, block size) and
  which fill modes it stays exact under (``fill_modes``),
* what deepen needs: whether it is an activation and where it is the identity (``activation``),
  and how to build a new identity instance of it (``insert``),
* how ``n2n inspect`` shows its parameters (``show_params``).

Nothing outside this package names an op: widen, deepen and inspect ask these fields.

Shapes here are the shape of ONE sample (no batch dimension), matching the architecture YAML.
Attributes that name a dimension (``flatten``'s ``start_dim``, ``concat``'s ``dim``) use
PyTorch's batched numbering, as the YAML does; :func:`sample_dim` converts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

Shape = tuple  # of ints: one sample, no batch dimension

REQUIRED = object()  # attribute default meaning "must be given"


class ShapeError(Exception):
    """An op's shape rule failed; the caller prefixes the node name."""


class AttrError(Exception):
    """An attribute value has the wrong type or range; the caller prefixes node and attribute."""


# --------------------------------------------------------------------------------------------
# Attribute parsers. Each takes the raw YAML value and returns the normalised value or raises
# AttrError with a short reason. bool is rejected where an int is expected: YAML `yes` is not 1.


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def int_attr(minimum: int = 0):
    def parse(v):
        if not _is_int(v):
            raise AttrError(f"must be an integer, got {v!r}")
        if v < minimum:
            raise AttrError(f"must be at least {minimum}, got {v}")
        return v

    return parse


def ints_attr(minimum: int = 0):
    """An int or a list of ints (one per spatial axis), as torch accepts."""
    one = int_attr(minimum)

    def parse(v):
        if isinstance(v, (list, tuple)):
            if not v:
                raise AttrError("must not be an empty list")
            return tuple(one(x) for x in v)
        return one(v)

    return parse


def float_attr(minimum: float = -math.inf, maximum: float = math.inf, exclusive_min=False):
    def parse(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise AttrError(f"must be a finite number, got {v!r}")
        if v < minimum or (exclusive_min and v == minimum) or v > maximum:
            raise AttrError(f"is out of range, got {v}")
        return float(v)

    return parse


def choice_attr(*choices):
    def parse(v):
        if v not in choices:
            raise AttrError(f"must be one of {', '.join(map(repr, choices))}, got {v!r}")
        return v

    return parse


def int_or_choice_attr(*choices, minimum: int = 0):
    ints = ints_attr(minimum)

    def parse(v):
        if isinstance(v, str):
            return choice_attr(*choices)(v)
        return ints(v)

    return parse


def dim_attr(v):
    """A dimension index in PyTorch's batched numbering; dim 0 (the batch) is not allowed."""
    if not _is_int(v):
        raise AttrError(f"must be an integer, got {v!r}")
    if v == 0:
        raise AttrError("must not be 0: dimension 0 is the batch")
    return v


@dataclass(frozen=True)
class Attr:
    parse: Callable[[Any], Any]
    default: Any = REQUIRED


@dataclass(frozen=True)
class Param:
    optional: bool = False


# --------------------------------------------------------------------------------------------
# Value ranges: closed intervals [lo, hi] that a value's elements are known to lie in.


@dataclass(frozen=True)
class Interval:
    lo: float = -math.inf
    hi: float = math.inf

    def union(self, other: "Interval") -> "Interval":
        return Interval(min(self.lo, other.lo), max(self.hi, other.hi))

    @property
    def nonnegative(self) -> bool:
        return self.lo >= 0

    def __str__(self) -> str:
        return f"[{self.lo:g}, {self.hi:g}]"


UNKNOWN = Interval()


def unknown_range(ranges, attrs) -> Interval:
    """Default for ops whose output range we do not track: anything."""
    return UNKNOWN


def same_range(ranges, attrs) -> Interval:
    """Ops that only move or select values (pooling by max, dropout at inference, flatten)."""
    return ranges[0]


def hull_range(ranges, attrs) -> Interval:
    """Ops whose outputs are drawn from, or averages of, their inputs' values."""
    out = ranges[0]
    for r in ranges[1:]:
        out = out.union(r)
    return out


def _mul(a: float, b: float) -> float:
    # 0 * inf is 0 here: a factor known to be exactly zero wins.
    if a == 0 or b == 0:
        return 0.0
    return a * b


def add_range(ranges, attrs) -> Interval:
    lo = sum(r.lo for r in ranges)
    hi = sum(r.hi for r in ranges)
    return Interval(lo if not math.isnan(lo) else -math.inf, hi if not math.isnan(hi) else math.inf)


def mul_range(ranges, attrs) -> Interval:
    out = ranges[0]
    for r in ranges[1:]:
        corners = [_mul(a, b) for a in (out.lo, out.hi) for b in (r.lo, r.hi)]
        out = Interval(min(corners), max(corners))
    return out


# --------------------------------------------------------------------------------------------


def no_widen(ctx, node, event):
    """Default widen rule: refuse. An op must declare how its units couple to be widened through."""
    ctx.refuse(
        node,
        f"op {node.op!r} declares no widening rule, so the tool cannot prove the widening exact",
    )


# Fill modes (see n2nsurgery.ops.units.FILL_MODES) an op stays exact under, when the widened
# units pass through it. Copy-like modes (a random copy map, or a uniform tile) keep replicas
# equal to their source, which every op with a widening rule honours; zero and average are
# declared only by ops that keep a zero unit zero, or are linear in their input.
COPY_LIKE = frozenset({"copy", "tile"})
ANY_FILL = frozenset({"copy", "tile", "zero", "average"})


@dataclass(frozen=True)
class Units:
    """An op whose output has units of its own (linear, conv): a widening can start at it, and
    the coupled walk ends at it (it produces the units in its rows, consumes them in its columns).

    ``axis(out_shape, attrs)``: the axis of the one-sample output that holds the units.
    ``block(attrs)``: rows per unit (1; an attention head would be head_dim rows).
    ``owns(attrs)``: whether its output units are its own; a depthwise conv's follow its input,
    so a tied twin of it cannot join a group through its rows.
    ``rows``: the parameter roles that hold the units; ``unit_dim(role)`` is the dim of that
    role's tensor along which they lie (0, the rows, for linear and conv; an embedding's
    ``[vocab, d]`` table and a transposed linear's ``[in, out]`` weight hold them in dim 1).
    """

    axis: Callable[[Shape, dict], int]
    block: Callable[[dict], int] = lambda attrs: 1
    owns: Callable[[dict], bool] = lambda attrs: True
    rows: tuple = ("weight", "bias")
    unit_dim: Callable[[str], int] = lambda role: 0


@dataclass(frozen=True)
class Activation:
    """An activation φ deepen may put after a new identity layer (and copies by default after
    a node of this op). ``identity_on(attrs, r)``: whether φ(v) = v for every v in interval r
    (attrs resolved, defaults filled in). ``where``: where φ(v) = v holds, for messages
    ("v ≥ 0"); None when it holds nowhere useful (sigmoid, tanh)."""

    identity_on: Callable[[dict, "Interval"], bool]
    where: Optional[str] = None


@dataclass(frozen=True)
class Insert:
    """How deepen builds a new instance of this op (docs/deepen.md#what-gets-inserted).

    ``word``: what deepen calls it: ``linear`` / ``conv`` (its ``--op`` words), ``batchnorm``
    (``--batchnorm``), ``sum`` (the join of a residual branch).
    ``fits(shape)``: whether it can read a value of this one-sample shape.
    ``kernel``: whether ``--kernel-size`` applies. ``short``: its name inside a residual branch
    (``NAME.fc1``, ``NAME.conv1``).
    ``attrs(kernel_size)``: the attributes of a new instance (a conv's padding k//2).
    ``weight_shape(out, in, kernel_size)``: the shape of a new instance's weight.
    ``identity(width, kernel_size, dtype)``: {role: tensor} that make it the identity on its input.
    """

    word: str
    fits: Callable[[Shape], bool] = lambda shape: True
    kernel: bool = False
    short: str = ""
    attrs: Callable[[int], dict] = lambda kernel_size: {}
    weight_shape: Optional[Callable[[int, int, int], tuple]] = None
    identity: Optional[Callable] = None


def show_params(shapes: Mapping[str, Shape]) -> str:
    """Default for how `n2n inspect` shows a node's parameters: 'weight[8, 3, 3, 3] bias[8]'."""
    return " ".join(f"{role}{fmt_shape(s)}" for role, s in shapes.items())


@dataclass(frozen=True)
class OpDef:
    """One op type. See the module docstring for what each field means."""

    name: str
    # (inputs: list[Tensor], params: dict[role, Tensor|None], attrs) -> Tensor. Params may be views
    # of the input file's memory map that are unmapped after the node: read them, never return
    # them (or a view of them) or write into them.
    forward: Callable
    infer_shape: Callable  # (in_shapes: list[Shape], param_shapes: dict[role, Shape|None], attrs) -> Shape
    arity: int = 1  # number of inputs; -1 means two or more
    attrs: Mapping[str, Attr] = field(default_factory=dict)
    params: Mapping[str, Param] = field(default_factory=dict)
    value_range: Callable = unknown_range  # (in_ranges: list[Interval], attrs) -> Interval
    widen: Callable = no_widen  # (ctx: WidenContext, node, event) -> None; see n2nsurgery.widen
    doc: str = ""
    units: Optional[Units] = None  # units of its own: widen starts here, the walk ends here
    fill_modes: frozenset = COPY_LIKE  # fill modes it stays exact under when widened units pass
    fill_why: str = ""  # why it allows only those (said when it is the member that refuses)
    activation: Optional[Activation] = None  # deepen may insert it after an identity layer
    insert: Optional[Insert] = None  # deepen can build a new instance of it
    show_params: Callable = show_params  # ({role: shape}) -> str, the inspect table's cell
    # Units are attention heads: (attrs, in_shapes, request, split, gen) -> units.HeadPlan, where
    # request is {"heads" | "kv_heads" | "head_dim": N}; raises units.PlanError when not exact.
    heads: Optional[Callable] = None
    # (ctx, node, factor) -> None: multiply this node's output by `factor` through its own
    # parameters (a norm's γ and β), asked when a tied head cannot take a tile's 1/k in its own
    # columns (see n2nsurgery.widen); None: it cannot, and the widening is refused.
    rescale: Optional[Callable] = None


REGISTRY: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    if op.name in REGISTRY:
        raise ValueError(f"op {op.name!r} registered twice")
    REGISTRY[op.name] = op
    return op


def unregister(name: str) -> None:
    """Remove an op (tests that register a throwaway op clean up with this)."""
    REGISTRY.pop(name, None)


def get_op(name: str) -> Optional[OpDef]:
    return REGISTRY.get(name)


def activation_names() -> tuple:
    """Ops deepen may insert as φ, in registry order."""
    return tuple(name for name, op in REGISTRY.items() if op.activation is not None)


def insertable(word: str, shape: Optional[Shape] = None) -> Optional[OpDef]:
    """The first op deepen builds for `word` (see :class:`Insert`) that can read `shape`."""
    for op in REGISTRY.values():
        if op.insert is not None and op.insert.word == word and (shape is None or op.insert.fits(tuple(shape))):
            return op
    return None


# --------------------------------------------------------------------------------------------
# Shape helpers shared by several ops.


def sample_dim(dim: int, rank: int) -> int:
    """Convert a batched PyTorch dim (1.. or negative) to an index into a one-sample shape."""
    batched_rank = rank + 1
    d = dim if dim >= 0 else dim + batched_rank
    if not 1 <= d < batched_rank:
        raise ShapeError(f"dim {dim} is out of range for an input of {rank} dimensions per sample")
    return d - 1


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise ShapeError(message)


def per_axis(value, n: int, what: str) -> tuple:
    """Expand an int-or-tuple attribute to one value per spatial axis."""
    if isinstance(value, tuple):
        expect(len(value) == n, f"{what} has {len(value)} values but the op has {n} spatial axes")
        return value
    return (value,) * n


def fmt_shape(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def broadcast(shapes) -> Shape:
    try:
        return tuple(torch.broadcast_shapes(*[torch.Size(s) for s in shapes]))
    except RuntimeError:
        raise ShapeError(
            "input shapes " + ", ".join(fmt_shape(s) for s in shapes) + " do not broadcast"
        ) from None


# --------------------------------------------------------------------------------------------
# Widening rules shared by several ops. A rule gets the WidenContext, the node, and an Event:
# "input" (input `event.index` was assigned `event.map` along `event.axis`) or "output".


def widen_passthrough(ctx, node, event):
    """Elementwise ops: units pass through unchanged, in both directions, along any axis."""
    if event.kind == "input":
        ctx.assign(node.name, event.axis, event.map)
    else:
        ctx.assign(node.inputs[0], event.axis, event.map)


def widen_channels_passthrough(ctx, node, event):
    """Spatial ops (pooling): channels (axis 0) pass through; their spatial axes cannot grow."""
    if event.axis != 0:
        ctx.refuse(node, f"{node.op} works along the axis being widened (axis {event.axis + 1} of the batched value), so new units would change its windows")
    widen_passthrough(ctx, node, event)
