"""Ops a model zoo needs (MobileNetV3, ConvNeXt, ShuffleNet, ViT heads): hard activations,
softmax, groupnorm, mean, permute / transpose / reshape, layer scale and stochastic depth.

Names and attributes match what the torch.fx importer maps modules to (issue 16). Dimension
attributes use PyTorch's batched numbering, as ``flatten`` does.
"""

import math

import torch
import torch.nn.functional as F

from .activations import _ZERO_KEEPING, _elementwise
from .conv import group_map
from .base import (
    ANY_FILL, COPY_LIKE, REQUIRED, Attr, AttrError, Interval, OpDef, Param, expect, float_attr, fmt_shape,
    int_attr, register, same_range, sample_dim, unknown_range, widen_passthrough,
)


def _f64(fn, v: float) -> float:
    return float(fn(torch.tensor(v, dtype=torch.float64)))


def _margin(v: float) -> float:
    """Room for float32 rounding of the real computation (ranges are computed in float64)."""
    return 1e-6 * max(1.0, abs(v))


def _hardsigmoid_range(ranges, a):
    r = ranges[0]
    lo = 0.0 if r.lo == -math.inf else max(0.0, _f64(F.hardsigmoid, r.lo) - _margin(1.0))
    hi = 1.0 if r.hi == math.inf else min(1.0, _f64(F.hardsigmoid, r.hi) + _margin(1.0))
    return Interval(lo, hi)


_HARDSWISH_MIN = -0.375  # at x = -1.5: falls on [-3, -1.5], rises after


def _hardswish_range(ranges, a):
    r = ranges[0]
    at = lambda v: 0.0 if v == -math.inf else (math.inf if v == math.inf else _f64(F.hardswish, v))  # noqa: E731
    ends = (at(r.lo), at(r.hi))
    lo = _HARDSWISH_MIN if r.lo <= -1.5 <= r.hi else min(ends) - _margin(min(ends))
    hi = max(ends) + (_margin(max(ends)) if max(ends) != math.inf else 0.0)
    return Interval(max(lo, _HARDSWISH_MIN), hi)


HARDSWISH = _elementwise(
    "hardswish", lambda xs, p, a: F.hardswish(xs[0]), _hardswish_range, doc="x · relu6(x + 3) / 6",
    fill_modes=_ZERO_KEEPING,  # hardswish(0) = 0
)
HARDSIGMOID = _elementwise(
    "hardsigmoid", lambda xs, p, a: F.hardsigmoid(xs[0]), _hardsigmoid_range, doc="relu6(x + 3) / 6",
    fill_modes=COPY_LIKE,  # hardsigmoid(0) = 1/2: a zero unit would not stay zero
)
STOCHASTIC_DEPTH = _elementwise(
    "stochastic_depth",
    lambda xs, p, a: xs[0],  # torchvision's StochasticDepth is the identity at inference
    same_range,
    attrs={"p": Attr(float_attr(0.0, 1.0), 0.5)},
    doc="Identity at inference (torchvision.ops.StochasticDepth).",
    fill_modes=ANY_FILL,
)


# ------------------------------------------------------------------------------ softmax


def _dim(v):
    if not isinstance(v, int) or isinstance(v, bool):
        raise AttrError(f"must be an integer, got {v!r}")
    return v


def _batch_free_dim(v):
    v = _dim(v)
    if v == 0:
        raise AttrError("must not be 0: dimension 0 is the batch")
    return v


def _same_shape(in_shapes, p, a):
    return tuple(in_shapes[0])


def _softmax_infer(in_shapes, p, a):
    sample_dim(a["dim"], len(in_shapes[0]))  # raises a ShapeError when out of range
    return tuple(in_shapes[0])


def _softmax_widen(ctx, node, event):
    """Each output reads every unit along `dim`, so widening that axis couples all of them."""
    if event.axis == sample_dim(ctx.attrs(node)["dim"], len(ctx.shape(node.name))):
        ctx.refuse(node, "softmax over the widened axis makes every output depend on every unit (new units change the normaliser); widen a layer whose units reach it along another axis")
    widen_passthrough(ctx, node, event)


SOFTMAX = register(
    OpDef(
        name="softmax",
        forward=lambda xs, p, a: torch.softmax(xs[0], a["dim"]),
        infer_shape=_softmax_infer,
        attrs={"dim": Attr(_batch_free_dim, REQUIRED)},
        value_range=lambda r, a: Interval(0.0, 1.0),
        widen=_softmax_widen,
        fill_modes=COPY_LIKE,  # softmax of a zero slice is uniform, not zero
        doc="softmax along dim (batched numbering).",
    )
)


# ------------------------------------------------------------------------------ groupnorm


def _groupnorm_infer(in_shapes, p, a):
    (x,) = in_shapes
    expect(len(x) >= 1, "input must have a channel axis")
    g, c = a["num_groups"], x[0]
    expect(c % g == 0, f"num_groups={g} does not divide the {c} channels")
    for role in ("weight", "bias"):
        s = p.get(role)
        if s is not None:
            expect(s == (c,), f"{role} must be [{c}] (one per channel), got {fmt_shape(s)}")
    return tuple(x)


def _groupnorm_widen(ctx, node, event):
    """Each group's mean and variance read all of its channels (and the spatial axes), so the
    channels are widened only when every group grows alike by a uniform k-fold copy of its own
    channels, laid out group by group: per group that is a tile, which keeps the statistics.
    γ and β are copied with the channels; the new channels' outputs are copies of their sources."""
    g = ctx.attrs(node)["num_groups"]
    if event.axis != 0:
        ctx.refuse(node, f"groupnorm normalises over its spatial axes too, so axis {event.axis + 1} of the batched value cannot grow")
    ctx.constrain(node, modes={"tile"}, groups=g, why=f"groupnorm (num_groups={g}) grows every group alike")
    group_map(ctx, node, event.map, g, f"groupnorm (num_groups={g}) needs its channels")
    ctx.remap(node, "weight", 0, event.map, "copy")
    ctx.remap(node, "bias", 0, event.map, "copy")
    widen_passthrough(ctx, node, event)


GROUPNORM = register(
    OpDef(
        name="groupnorm",
        forward=lambda xs, p, a: F.group_norm(xs[0], a["num_groups"], p.get("weight"), p.get("bias"), a["eps"]),
        infer_shape=_groupnorm_infer,
        attrs={"num_groups": Attr(int_attr(1), REQUIRED), "eps": Attr(float_attr(0.0), 1e-5)},
        params={"weight": Param(optional=True), "bias": Param(optional=True)},
        widen=_groupnorm_widen,
        fill_modes=frozenset({"tile"}),
        fill_why="groupnorm reads each group's mean and variance: only a uniform k-fold copy of every group's channels keeps them",
        doc="GroupNorm over [channels, *spatial]: channels in num_groups groups.",
    )
)


# ------------------------------------------------------------------------------ mean


def _dims_attr(v):
    """An int or a non-empty list of ints, batched numbering (0, the batch, excluded)."""
    if isinstance(v, (list, tuple)):
        if not v:
            raise AttrError("must not be an empty list")
        return tuple(_batch_free_dim(d) for d in v)
    return _batch_free_dim(v)


def _bool_attr(v):
    if not isinstance(v, bool):
        raise AttrError(f"must be true or false, got {v!r}")
    return v


def _reduced(rank: int, a) -> tuple:
    dims = a["dim"] if isinstance(a["dim"], tuple) else (a["dim"],)
    axes = tuple(sorted(sample_dim(d, rank) for d in dims))
    expect(len(set(axes)) == len(axes), f"dim {a['dim']} names an axis twice")
    return axes


def _mean_infer(in_shapes, p, a):
    (x,) = in_shapes
    axes = _reduced(len(x), a)
    if a["keepdim"]:
        return tuple(1 if i in axes else n for i, n in enumerate(x))
    return tuple(n for i, n in enumerate(x) if i not in axes)


def _mean_widen(ctx, node, event):
    """Axes not reduced pass through, renumbered when keepdim is false; a reduced axis averages
    all its units together, so it cannot be widened."""
    rank = len(ctx.shape(node.inputs[0]))
    a = ctx.attrs(node)
    axes = _reduced(rank, a)
    kept = list(range(rank)) if a["keepdim"] else [i for i in range(rank) if i not in axes]
    if event.kind == "input":
        if event.axis in axes:
            ctx.refuse(node, f"mean over the widened axis (axis {event.axis + 1} of the batched value) averages every unit together, so new units change it; widen a layer whose units it does not average")
        ctx.assign(node.name, kept.index(event.axis), event.map)
    else:
        source = kept[event.axis]
        if source in axes:
            ctx.refuse(node, "its output axis is a mean over units and cannot grow")
        ctx.assign(node.inputs[0], source, event.map)


MEAN = register(
    OpDef(
        name="mean",
        forward=lambda xs, p, a: torch.mean(xs[0], dim=a["dim"], keepdim=a["keepdim"]),
        infer_shape=_mean_infer,
        attrs={"dim": Attr(_dims_attr, REQUIRED), "keepdim": Attr(_bool_attr, False)},
        value_range=same_range,  # averages stay in the hull of their inputs
        widen=_mean_widen,
        fill_modes=ANY_FILL,  # linear in its input, per kept unit
        doc="torch.mean over dim (int or list, batched numbering).",
    )
)


# ------------------------------------------------------------------------------ permute / transpose


def _perm_attr(v):
    if not isinstance(v, (list, tuple)) or not v:
        raise AttrError(f"must be a non-empty list of dimensions, got {v!r}")
    dims = tuple(_dim(d) for d in v)
    if dims[0] != 0:
        raise AttrError(f"must keep the batch (dimension 0) first, got {list(dims)}")
    return dims


def _sample_perm(rank: int, a) -> list:
    """The permutation of one-sample axes: output axis i is input axis perm[i]."""
    dims = a["dims"]
    expect(len(dims) == rank + 1, f"dims {list(dims)} has {len(dims)} entries but the input has {rank + 1} dimensions (batch included)")
    perm = [d % (rank + 1) - 1 for d in dims[1:]]
    expect(sorted(perm) == list(range(rank)), f"dims {list(dims)} is not a permutation of the {rank + 1} dimensions")
    return perm


def _permute_infer(in_shapes, p, a):
    (x,) = in_shapes
    return tuple(x[i] for i in _sample_perm(len(x), a))


def _widen_moved(perm_of):
    """Units follow the axis they are on: input axis perm[i] becomes output axis i."""

    def widen(ctx, node, event):
        perm = perm_of(len(ctx.shape(node.inputs[0])), ctx.attrs(node))
        if event.kind == "input":
            ctx.assign(node.name, perm.index(event.axis), event.map)
        else:
            ctx.assign(node.inputs[0], perm[event.axis], event.map)

    return widen


def _swap(rank: int, a) -> list:
    perm = list(range(rank))
    i, j = sample_dim(a["dim0"], rank), sample_dim(a["dim1"], rank)
    perm[i], perm[j] = perm[j], perm[i]
    return perm


PERMUTE = register(
    OpDef(
        name="permute",
        forward=lambda xs, p, a: xs[0].permute(a["dims"]),
        infer_shape=_permute_infer,
        attrs={"dims": Attr(_perm_attr, REQUIRED)},
        value_range=same_range,
        widen=_widen_moved(_sample_perm),
        fill_modes=ANY_FILL,  # it only moves values
        doc="Tensor.permute(dims), batched numbering with the batch first.",
    )
)

TRANSPOSE = register(
    OpDef(
        name="transpose",
        forward=lambda xs, p, a: xs[0].transpose(a["dim0"], a["dim1"]),
        infer_shape=lambda s, p, a: tuple(s[0][i] for i in _swap(len(s[0]), a)),
        attrs={"dim0": Attr(_batch_free_dim, REQUIRED), "dim1": Attr(_batch_free_dim, REQUIRED)},
        value_range=same_range,
        widen=_widen_moved(_swap),
        fill_modes=ANY_FILL,
        doc="Tensor.transpose(dim0, dim1), batched numbering (the batch stays put).",
    )
)


# ------------------------------------------------------------------------------ reshape


def _shape_attr(v):
    if not isinstance(v, (list, tuple)) or not v:
        raise AttrError(f"must be a non-empty list (one sample's shape, -1 allowed once), got {v!r}")
    for n in v:
        if not isinstance(n, int) or isinstance(n, bool) or (n < 1 and n != -1):
            raise AttrError(f"entries must be positive integers or -1, got {v!r}")
    if list(v).count(-1) > 1:
        raise AttrError(f"may hold -1 only once, got {list(v)}")
    return tuple(v)


def _resolve(x, shape) -> tuple:
    total = math.prod(x)
    known = math.prod(n for n in shape if n != -1)
    if -1 in shape:
        expect(known > 0 and total % known == 0, f"shape {list(shape)} does not fit the input {fmt_shape(x)} ({total} values)")
        return tuple(total // known if n == -1 else n for n in shape)
    expect(known == total, f"shape {list(shape)} holds {known} values but the input {fmt_shape(x)} has {total}")
    return tuple(shape)


def _reshape_infer(in_shapes, p, a):
    return _resolve(in_shapes[0], a["shape"])


def _untouched(x, y, axis: int):
    """The output axis that is input `axis` unchanged (same size, same number of values before
    and after it), or None when the reshape splits or merges it."""
    before = math.prod(x[:axis])
    for b, n in enumerate(y):
        if n == x[axis] and math.prod(y[:b]) == before and n != 1:
            return b
    return None


def _reshape_widen(ctx, node, event):
    """Units pass when their axis is left whole (only the axes around it are reshaped); an explicit
    size in `shape` for that axis grows with it. Splitting the axis is refused: a ShuffleNet
    channel shuffle (split into (groups, C/groups), then transpose) interleaves groups."""
    x, y = ctx.shape(node.inputs[0]), ctx.shape(node.name)
    shape = list(ctx.attrs(node)["shape"])
    if event.kind == "input":
        a, b = event.axis, _untouched(x, y, event.axis)
    else:
        a, b = _untouched(y, x, event.axis), event.axis
    if a is None or b is None:
        ctx.refuse(
            node,
            f"it splits or merges the widened axis ({fmt_shape(x)} -> {fmt_shape(y)}); a channel shuffle interleaves groups, "
            "so new units would land inside other groups; widen a layer whose units it leaves whole",
        )
    if shape[b] != -1:
        shape[b] = event.map.size
        ctx.set_attr(node, "shape", shape)
    if event.kind == "input":
        ctx.assign(node.name, b, event.map)
    else:
        ctx.assign(node.inputs[0], a, event.map)


RESHAPE = register(
    OpDef(
        name="reshape",
        forward=lambda xs, p, a: xs[0].reshape((xs[0].shape[0],) + tuple(a["shape"])),
        infer_shape=_reshape_infer,
        attrs={"shape": Attr(_shape_attr, REQUIRED)},
        value_range=same_range,
        widen=_reshape_widen,
        fill_modes=ANY_FILL,
        doc="reshape each sample to shape (one sample's shape, -1 once).",
    )
)


# ------------------------------------------------------------------------------ layer_scale


def _scaled_axis(x, w) -> int:
    """The axis weight [C] (channels last, ConvNeXt's [H, W, C] or a ViT's [T, C]) or
    [C, 1, 1] (channels first) scales, by right-aligned broadcasting."""
    expect(len(w) >= 1 and all(n == 1 for n in w[1:]), f"weight must be [C] or [C, 1, ...], got {fmt_shape(w)}")
    expect(len(w) <= len(x), f"weight {fmt_shape(w)} has more axes than the input {fmt_shape(x)}")
    return len(x) - len(w)


def _layer_scale_infer(in_shapes, p, a):
    (x,) = in_shapes
    w = p["weight"]
    axis = _scaled_axis(x, w)
    expect(w[0] == x[axis], f"weight {fmt_shape(w)} scales axis {axis + 1} of the batched input, which has {x[axis]} units (input {fmt_shape(x)})")
    return tuple(x)


def _layer_scale_widen(ctx, node, event):
    """The per-channel weight follows the channels, copied from the source channel."""
    w = ctx.param_shape(node, "weight")
    if event.axis == _scaled_axis(ctx.shape(node.name), w):
        ctx.remap(node, "weight", 0, event.map, "copy")
    widen_passthrough(ctx, node, event)


LAYER_SCALE = register(
    OpDef(
        name="layer_scale",
        forward=lambda xs, p, a: xs[0] * p["weight"],
        infer_shape=_layer_scale_infer,
        params={"weight": Param()},
        value_range=unknown_range,
        widen=_layer_scale_widen,
        fill_modes=COPY_LIKE | {"zero"},  # 0 · γ = 0; the mean times a copied γ is not a mean
        doc="x * weight, weight [C] (channels last) or [C, 1, 1] (channels first).",
    )
)
