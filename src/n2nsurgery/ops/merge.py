"""Ops that merge several inputs: add, mul (broadcasting) and concat."""

import torch

from .base import Attr, OpDef, add_range, broadcast, dim_attr, expect, fmt_shape, hull_range, mul_range, register, sample_dim


def _add(xs, p, a):
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def _mul(xs, p, a):
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


ADD = register(OpDef(name="add", forward=_add, infer_shape=_broadcast_infer, arity=-1, value_range=add_range))
MUL = register(OpDef(name="mul", forward=_mul, infer_shape=_broadcast_infer, arity=-1, value_range=mul_range))
CONCAT = register(
    OpDef(
        name="concat",
        forward=lambda xs, p, a: torch.cat(xs, dim=a["dim"]),
        infer_shape=_concat_infer,
        arity=-1,
        attrs={"dim": Attr(dim_attr, 1)},
        value_range=hull_range,
    )
)
