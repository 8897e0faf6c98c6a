"""Ops that merge several inputs: add, mul (broadcasting) and concat."""

import torch

from .base import ANY_FILL, COPY_LIKE, Attr, Insert, OpDef, add_range, broadcast, dim_attr, expect, fmt_shape, hull_range, mul_range, register, sample_dim
from .units import UnitMap


def _per_sample(xs):
    """Batched inputs aligned for broadcasting by their ONE-SAMPLE shapes, as the shape rule and
    the YAML mean it: a lower-rank input gains size-1 axes after the batch axis, never before it
    (plain torch broadcasting would line its batch axis up with a feature axis)."""
    rank = max(x.dim() for x in xs)
    return [x.reshape(x.shape[:1] + (1,) * (rank - x.dim()) + x.shape[1:]) for x in xs]


def _add(xs, p, a):
    xs = _per_sample(xs)
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def _mul(xs, p, a):
    xs = _per_sample(xs)
    out = xs[0]
    for x in xs[1:]:
        out = out * x
    return out


def _broadcast_infer(in_shapes, p, a):
    return broadcast(in_shapes)


def _concat_infer(in_shapes, p, a):
    rank = len(in_shapes[0])
    expect(all(len(s) == rank for s in in_shapes), "inputs have different ranks: " + ", ".join(fmt_shape(s) for s in in_shapes))
    d = sample_dim(a["dim"], rank)
    for s in in_shapes[1:]:
        expect(
            all(s[i] == in_shapes[0][i] for i in range(rank) if i != d),
            "inputs differ outside the concat dim: " + ", ".join(fmt_shape(s) for s in in_shapes),
        )
    out = list(in_shapes[0])
    out[d] = sum(s[d] for s in in_shapes)
    return tuple(out)


def _widen_elementwise(ctx, node, event):
    """add/mul: all operands share one unit space (a residual skip and its branch must agree), so
    assigning one operand assigns the output and every other operand that is not broadcast along
    that axis; their producers are pulled into the group."""
    out_shape = ctx.shape(node.name)
    rank = len(out_shape)
    if event.kind == "input":
        in_shape = ctx.shape(node.inputs[event.index])
        out_axis = event.axis + (rank - len(in_shape))
        if in_shape[event.axis] != out_shape[out_axis]:
            ctx.refuse(node, "the widened operand is broadcast here, so its new units would not line up with the other operands")
    else:
        out_axis = event.axis
    ctx.assign(node.name, out_axis, event.map)
    for name in node.inputs:
        shape = ctx.shape(name)
        axis = out_axis - (rank - len(shape))
        if axis >= 0 and shape[axis] != 1:  # size 1 broadcasts: it needs no new units
            ctx.assign(name, axis, event.map)


def _widen_concat(ctx, node, event):
    """Along the concat dim each input owns a segment at an offset: the output's map is the
    segments' maps laid end to end (identity for inputs outside the group). That needs every
    input's map, so it is resolved once the rest of the walk is done. Along other axes, all
    inputs and the output share the map."""
    rank = len(ctx.shape(node.name))
    dim = sample_dim(ctx.attrs(node)["dim"], rank)
    if event.axis != dim:
        ctx.assign(node.name, event.axis, event.map)
        for name in node.inputs:
            ctx.assign(name, event.axis, event.map)
        return
    if event.kind == "output":
        ctx.refuse(node, "its concatenated axis cannot be widened from the consumer side; widen one of its inputs instead")

    def resolve():
        parts = []
        for name in node.inputs:
            assigned = ctx.map_of(name)
            if assigned is not None and assigned[0] == dim:
                parts.append(assigned[1])
            else:
                parts.append(UnitMap.identity(ctx.shape(name)[dim]))
        ctx.assign(node.name, dim, UnitMap.cat(parts))

    ctx.defer(node, resolve)


ADD = register(
    OpDef(
        name="add", forward=_add, infer_shape=_broadcast_infer, arity=-1, value_range=add_range, widen=_widen_elementwise,
        fill_modes=ANY_FILL,  # linear: sums of zeros are zero, sums of means are the mean of sums
        insert=Insert(word="sum"),  # the join of a residual branch
    )
)
MUL = register(
    OpDef(
        name="mul", forward=_mul, infer_shape=_broadcast_infer, arity=-1, value_range=mul_range, widen=_widen_elementwise,
        fill_modes=COPY_LIKE | {"zero"},  # 0 · x = 0, but a product of means is not a mean
    )
)
CONCAT = register(
    OpDef(
        name="concat",
        forward=lambda xs, p, a: torch.cat(xs, dim=a["dim"]),
        infer_shape=_concat_infer,
        arity=-1,
        attrs={"dim": Attr(dim_attr, 1)},
        value_range=hull_range,
        widen=_widen_concat,
        fill_modes=ANY_FILL,  # it only lays segments side by side
    )
)
