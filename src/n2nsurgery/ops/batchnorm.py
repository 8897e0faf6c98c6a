"""batchnorm: per-channel (axis 0) normalisation with running statistics, at inference."""

import torch
import torch.nn.functional as F

from .base import Attr, Insert, OpDef, Param, expect, float_attr, fmt_shape, register, show_params


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


_EPS = 1e-5  # torch.nn.BatchNorm's default, so a new layer loads into a default module


def _identity(width, kernel_size, dtype):
    """Tensors that make a new batchnorm the identity at inference.

    ``(x − 0) / sqrt((1 − eps) + eps) · 1 + 0``: var + eps is exactly 1 in float32 and float64,
    so the scale is exactly 1 (in float16/bfloat16 var rounds to 1 and the scale is 1 − 5e-6).
    """
    return {
        "weight": torch.ones(width, dtype=dtype),
        "bias": torch.zeros(width, dtype=dtype),
        "running_mean": torch.zeros(width, dtype=dtype),
        "running_var": torch.full((width,), 1.0 - _EPS, dtype=torch.float64).to(dtype),
        "num_batches_tracked": torch.zeros((), dtype=torch.int64),
    }


def _show_params(shapes) -> str:
    """The four per-channel vectors as '4×[8]' when they agree (every role is in --json)."""
    vectors = [r for r, s in shapes.items() if r in _PER_CHANNEL and len(s) == 1]
    if "running_mean" in shapes and len({tuple(shapes[r]) for r in vectors}) == 1:
        return f"{len(vectors)}×{fmt_shape(shapes['running_mean'])}"
    return show_params(shapes)


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
        # fill_modes: copy-like only. Its statistics are copied per channel, and bn(0) ≠ 0.
        insert=Insert(word="batchnorm", fits=lambda shape: len(shape) >= 1, identity=_identity),
        show_params=_show_params,
    )
)
