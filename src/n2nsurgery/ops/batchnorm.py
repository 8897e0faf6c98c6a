"""batchnorm: per-channel (axis 0) normalisation with running statistics, at inference."""

import torch.nn.functional as F

from .base import Attr, OpDef, Param, expect, float_attr, fmt_shape, register


def _infer(in_shapes, p, a):
    (x,) = in_shapes
    expect(len(x) >= 1, "input must have a channel axis")
    c = x[0]
    for role in ("weight", "bias", "running_mean", "running_var"):
        s = p.get(role)
        if s is not None:
            expect(s == (c,), f"{role} must be [{c}] (one per input channel), got {fmt_shape(s)}")
    if p.get("num_batches_tracked") is not None:
        expect(p["num_batches_tracked"] == (), "num_batches_tracked must be a scalar")
    return tuple(x)


def _forward(xs, p, a):
    # Always inference mode: running statistics, never batch statistics.
    return F.batch_norm(
        xs[0], p["running_mean"], p["running_var"], p.get("weight"), p.get("bias"), False, 0.0, a["eps"]
    )


_PER_CHANNEL = ("weight", "bias", "running_mean", "running_var")


def _widen(ctx, node, event):
    """Per-channel statistics and affine parameters follow the channels, copied from the source
    channel (never reset to defaults); other axes pass straight through."""
    if event.axis == 0:
        for role in _PER_CHANNEL:
            ctx.remap(node, role, 0, event.map, "copy")
    if event.kind == "input":
        ctx.assign(node.name, event.axis, event.map)
    else:
        ctx.assign(node.inputs[0], event.axis, event.map)


BATCHNORM = register(
    OpDef(
        name="batchnorm",
        forward=_forward,
        infer_shape=_infer,
        widen=_widen,
        attrs={"eps": Attr(float_attr(0.0, exclusive_min=True), 1e-5)},
        params={
            "weight": Param(optional=True),
            "bias": Param(optional=True),
            "running_mean": Param(),
            "running_var": Param(),
            # Carried along for state_dict compatibility; never used at inference.
            "num_batches_tracked": Param(optional=True),
        },
        doc="BatchNorm at inference: (x - running_mean) / sqrt(running_var + eps) * weight + bias.",
    )
)
