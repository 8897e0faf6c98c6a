"""linear_t: a linear layer whose weight is stored transposed, ``[in, out]`` (GPT-2's Conv1D).

GPT-2 checkpoints keep their projections (``c_attn``, ``c_proj``, ``c_fc``) in Hugging Face's
``Conv1D`` layout: ``y = x @ W + b`` with ``W`` of shape ``[in, out]``. A separate op, rather
than an attribute of ``linear``, keeps each layout's shape rule and (later) widening rule in one
place: here rows of ``W`` are input features and columns are output units, the other way round
from ``linear``.

Refuses widening for now (the default rule of :mod:`.base`).
"""

import torch

from .base import OpDef, Param, expect, fmt_shape, register


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


LINEAR_T = register(
    OpDef(
        name="linear_t",
        forward=_forward,
        infer_shape=_infer,
        params={"weight": Param(), "bias": Param(optional=True)},
        doc="Linear layer with the weight stored [in, out]: y = x @ W + b (GPT-2's Conv1D).",
    )
)
