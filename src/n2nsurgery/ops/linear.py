"""linear: y = x Wᵀ + b over the last axis of x. Weight [out, in], bias [out]."""

import torch.nn.functional as F

from .base import OpDef, Param, expect, fmt_shape, register


def _infer(in_shapes, p, attrs):
    (x,) = in_shapes
    w = p["weight"]
    expect(len(x) >= 1, "input must have at least one dimension per sample")
    expect(len(w) == 2, f"weight must be 2-D [out, in], got {fmt_shape(w)}")
    expect(
        w[1] == x[-1],
        f"weight {fmt_shape(w)} expects {w[1]} input features but the input has {x[-1]} "
        f"(input shape {fmt_shape(x)})",
    )
    if p.get("bias") is not None:
        expect(p["bias"] == (w[0],), f"bias must be [{w[0]}], got {fmt_shape(p['bias'])}")
    return tuple(x[:-1]) + (w[0],)


LINEAR = register(
    OpDef(
        name="linear",
        forward=lambda xs, p, a: F.linear(xs[0], p["weight"], p.get("bias")),
        infer_shape=_infer,
        params={"weight": Param(), "bias": Param(optional=True)},
        doc="Fully connected layer over the last axis.",
    )
)
