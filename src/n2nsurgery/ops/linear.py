"""linear: y = x Wᵀ + b over the last axis of x. Weight [out, in], bias [out]."""

import torch
import torch.nn.functional as F

from .base import ANY_FILL, Insert, OpDef, Param, Units, expect, fmt_shape, register


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


def _widen(ctx, node, event):
    """Units are the features of the last axis; every other axis passes straight through."""
    features = len(ctx.shape(node.name)) - 1
    if event.axis != features:  # a batch-like axis of the input: linear is applied per position
        if event.kind == "input":
            ctx.assign(node.name, event.axis, event.map)
        else:
            ctx.assign(node.inputs[0], event.axis, event.map)
    elif event.kind == "output":  # this layer produces the widened units: copy its rows
        ctx.remap(node, "weight", 0, event.map, "rows")
        ctx.remap(node, "bias", 0, event.map, "rows")
    else:  # this layer consumes them: replicas split the original column
        ctx.remap(node, "weight", 1, event.map, "cols")


def _identity(width, kernel_size, dtype):
    """The identity matrix and a zero bias: y = x."""
    return {"weight": torch.eye(width, dtype=torch.float32).to(dtype), "bias": torch.zeros(width, dtype=dtype)}


LINEAR = register(
    OpDef(
        name="linear",
        forward=lambda xs, p, a: F.linear(xs[0], p["weight"], p.get("bias")),
        infer_shape=_infer,
        widen=_widen,
        params={"weight": Param(), "bias": Param(optional=True)},
        doc="Fully connected layer over the last axis.",
        units=Units(axis=lambda shape, attrs: len(shape) - 1),  # features: the last axis
        fill_modes=ANY_FILL,  # it ends the chain: its rows and columns take any fill
        # Over the last axis, like torch.nn.Linear: fits any value with at least one axis.
        insert=Insert(
            word="linear",
            fits=lambda shape: len(shape) >= 1,
            short="fc",
            weight_shape=lambda out, inp, k: (out, inp),
            identity=_identity,
        ),
    )
)
