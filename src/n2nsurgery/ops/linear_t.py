"""linear_t: a linear layer whose weight is stored transposed, ``[in, out]`` (GPT-2's Conv1D).

GPT-2 checkpoints keep their projections (``c_attn``, ``c_proj``, ``c_fc``) in Hugging Face's
``Conv1D`` layout: ``y = x @ W + b`` with ``W`` of shape ``[in, out]``. A separate op, rather
than an attribute of ``linear``, keeps each layout's shape rule and (later) widening rule in one
place: here rows of ``W`` are input features and columns are output units, the other way round
from ``linear``.

Widening follows ``linear``'s rule with the dims swapped: as a producer (``c_fc`` of GPT-2's
MLP) its units are the weight's columns (dim 1) and the bias; as a consumer (``c_proj``, or a
reader of the residual stream) its inputs are the weight's rows (dim 0).
"""

import torch

from .base import ANY_FILL, OpDef, Param, Units, expect, fmt_shape, register


def _infer(in_shapes, p, a):
    (x,) = in_shapes
    w = p["weight"]
    expect(len(x) >= 1, "input must have at least one dimension per sample")
    expect(len(w) == 2, f"weight must be 2-D [in, out] (the transposed layout), got {fmt_shape(w)}")
    expect(
        w[0] == x[-1],
        f"weight {fmt_shape(w)} is [in, out] and expects {w[0]} input features but the input has "
        f"{x[-1]} (input shape {fmt_shape(x)}); a weight stored [out, in] belongs to op linear",
    )
    if p.get("bias") is not None:
        expect(p["bias"] == (w[1],), f"bias must be [{w[1]}], got {fmt_shape(p['bias'])}")
    return tuple(x[:-1]) + (w[1],)


def _forward(xs, p, a):
    # The same calls as transformers' Conv1D.forward, so the rounding is the same too.
    x, w, b = xs[0], p["weight"], p.get("bias")
    flat = x.reshape(-1, x.shape[-1])
    out = torch.addmm(b, flat, w) if b is not None else flat @ w
    return out.reshape(x.shape[:-1] + (w.shape[1],))


def _widen(ctx, node, event):
    """Units are the features of the last axis; every other axis passes straight through."""
    features = len(ctx.shape(node.name)) - 1
    if event.axis != features:  # a batch-like axis of the input: applied per position
        if event.kind == "input":
            ctx.assign(node.name, event.axis, event.map)
        else:
            ctx.assign(node.inputs[0], event.axis, event.map)
    elif event.kind == "output":  # this layer produces the widened units: its columns, its bias
        ctx.remap(node, "weight", 1, event.map, "rows")
        ctx.remap(node, "bias", 0, event.map, "rows")
    else:  # this layer consumes them: replicas split the original row
        ctx.remap(node, "weight", 0, event.map, "cols")


LINEAR_T = register(
    OpDef(
        name="linear_t",
        forward=_forward,
        infer_shape=_infer,
        params={"weight": Param(), "bias": Param(optional=True)},
        widen=_widen,
        # features: the last axis; they are the weight's dim 1 ([in, out]) and the bias's dim 0
        units=Units(axis=lambda shape, attrs: len(shape) - 1, unit_dim=lambda role: 1 if role == "weight" else 0),
        fill_modes=ANY_FILL,  # it ends the chain: its rows and columns take any fill
        doc="Linear layer with the weight stored [in, out]: y = x @ W + b (GPT-2's Conv1D).",
    )
)
