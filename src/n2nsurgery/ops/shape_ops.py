"""flatten: merge a run of axes into one, as torch.flatten does."""

import math

import torch

from .base import ANY_FILL, Attr, AttrError, OpDef, expect, register, same_range, sample_dim


def _any_dim(v):
    if not isinstance(v, int) or isinstance(v, bool):
        raise AttrError(f"must be an integer, got {v!r}")
    return v


def flatten_span(rank: int, a) -> tuple:
    """(first, last) one-sample axes merged by flatten, inclusive."""
    expect(a["start_dim"] != 0, "start_dim must not be 0: dimension 0 is the batch")
    s = sample_dim(a["start_dim"], rank)
    e = sample_dim(a["end_dim"], rank)
    expect(s <= e, f"start_dim {a['start_dim']} comes after end_dim {a['end_dim']}")
    return s, e


def _infer(in_shapes, p, a):
    (x,) = in_shapes
    expect(len(x) >= 1, "input must have at least one axis per sample")
    s, e = flatten_span(len(x), a)
    return tuple(x[:s]) + (math.prod(x[s : e + 1]),) + tuple(x[e + 1 :])


def _widen(ctx, node, event):
    """Axes outside the merged run pass through (renumbered); a merged axis becomes blocks of the
    flat axis: unit c of [C, H, W] owns features [c·H·W, (c+1)·H·W), for any H and W."""
    x = ctx.shape(node.inputs[0])
    s, e = flatten_span(len(x), ctx.attrs(node))
    if event.kind == "output":
        if event.axis == s:
            if e > s:
                ctx.refuse(node, "its merged output axis cannot be widened from the consumer side; widen the layer before the flatten")
            ctx.assign(node.inputs[0], event.axis, event.map)  # nothing merged: a plain pass-through
        else:
            ctx.assign(node.inputs[0], event.axis if event.axis < s else event.axis + (e - s), event.map)
        return
    a = event.axis
    if a < s:
        ctx.assign(node.name, a, event.map)
    elif a > e:
        ctx.assign(node.name, a - (e - s), event.map)
    else:
        ctx.assign(node.name, s, event.map.along(tuple(x[s : e + 1]), a - s))


FLATTEN = register(
    OpDef(
        name="flatten",
        forward=lambda xs, p, a: torch.flatten(xs[0], a["start_dim"], a["end_dim"]),
        infer_shape=_infer,
        widen=_widen,
        attrs={"start_dim": Attr(_any_dim, 1), "end_dim": Attr(_any_dim, -1)},
        value_range=same_range,
        fill_modes=ANY_FILL,  # it only moves values
    )
)
