"""layernorm and rmsnorm: normalisation over the last axis, as transformer blocks use them.

Both normalise each position's feature vector (the last axis) by statistics of that vector, so
no unit of the last axis is independent of the others: widening through a norm needs the rules
of docs/widen.md#transformer-layers (average expansion, zero-padding, tiling), which are not implemented yet. Until then
both refuse widening (the default rule of :mod:`.base`).
"""

import torch
import torch.nn.functional as F

from .base import Attr, OpDef, Param, expect, float_attr, fmt_shape, register


def _infer(in_shapes, p, a):
    (x,) = in_shapes
    expect(len(x) >= 1, "input must have at least one axis per sample (the features it normalises)")
    d = x[-1]
    for role in ("weight", "bias"):
        s = p.get(role)
        if s is not None:
            expect(s == (d,), f"{role} must be [{d}] (one per feature of the last axis), got {fmt_shape(s)}")
    return tuple(x)


def _layernorm(xs, p, a):
    x = xs[0]
    return F.layer_norm(x, (x.shape[-1],), p.get("weight"), p.get("bias"), a["eps"])


def _rmsnorm(xs, p, a):
    # Hugging Face's LlamaRMSNorm (and Mistral's, Qwen2's): the statistics in float32 whatever the
    # input dtype, the normalised value cast back before the weight multiplies it. A float64 input
    # stays float64 (HF would round it to float32; the tool never computes below the input's
    # precision).
    x = xs[0]
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    variance = wide.pow(2).mean(-1, keepdim=True)
    wide = wide * torch.rsqrt(variance + a["eps"])
    out = wide.to(x.dtype)
    weight = p.get("weight")
    return out if weight is None else weight * out


_EPS = float_attr(0.0)  # eps = 0 is allowed (torch accepts it); an all-zero vector then gives NaN

LAYERNORM = register(
    OpDef(
        name="layernorm",
        forward=_layernorm,
        infer_shape=_infer,
        attrs={"eps": Attr(_EPS, 1e-5)},
        params={"weight": Param(optional=True), "bias": Param(optional=True)},
        doc="LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * weight + bias.",
    )
)

RMSNORM = register(
    OpDef(
        name="rmsnorm",
        forward=_rmsnorm,
        infer_shape=_infer,
        attrs={"eps": Attr(_EPS, 1e-6)},
        params={"weight": Param(optional=True)},
        doc="RMSNorm over the last axis, in float32 at least: weight * x / sqrt(mean(x²) + eps).",
    )
)
