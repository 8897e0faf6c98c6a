"""layernorm and rmsnorm: normalisation over the last axis, as transformer blocks use them.

Both normalise each position's feature vector (the last axis) by statistics of that vector, so
no unit of the last axis is independent of the others. Widening the features (d_model: the
residual stream) through a norm is exact only in the modes of docs/transformers.md, n → q features:

* ``tile`` (q = k·n, both norms): every feature copied k times leaves the mean, the variance and
  the mean square unchanged: γ and β tiled, eps unchanged.
* ``zero`` (RMSNorm): new features 0 leave Σx² unchanged, so mean(x²) becomes n/q of itself:
  γ of the old features × √(n/q) and eps × n/q give the old outputs back; the new outputs are
  γ_new · 0 = 0 for any γ_new.
* ``average`` (LayerNorm): new features equal to mean(x) keep the mean and leave Σ(x - μ)²
  unchanged: γ old × √(n/q), eps × n/q; the new outputs are β_new = 0.

A random copy map is never exact (the statistics weigh the copied features more), zero-padding
shifts LayerNorm's mean, and the mean as a new feature changes RMSNorm's mean square: each
norm's ``fill_modes`` says which of these it allows, and the planner refuses the rest.
"""

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from .base import Attr, OpDef, Param, expect, float_attr, fmt_shape, register, widen_passthrough


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


# The new features' γ: any value is exact (their normalised value is 0), and 1 rather than 0
# lets training use them: with γ 0 no gradient would reach them through the norm.
NEW_GAMMA = 1.0


def _widen_rule(modes: frozenset):
    """The rule of a norm exact under fill `modes` (besides tile): the features (the last axis)
    go through with γ (and β) remapped for the fill mode; other axes are per position."""

    def widen(ctx, node, event):
        if event.axis != len(ctx.shape(node.name)) - 1:
            widen_passthrough(ctx, node, event)
            return
        m = event.map
        if m.fill not in modes | {"copy"}:  # copy: the collecting walk's stand-in (fill_modes refuses it)
            # e.g. LayerNorm behind another norm, whose new outputs are 0 rather than the mean
            ctx.refuse(node, f"the new features reaching it are {m.fill} features, which it does not keep exact; use --split tile")
        if event.kind == "output":
            _widen_from_output(ctx, node, m, modes)
        elif m.fill in ("zero", "average"):
            _widen_rescaled(ctx, node, m)
        else:
            _tile(ctx, node, m)
            ctx.assign(node.name, event.axis, m)

    return widen


def _widen_from_output(ctx, node, m, modes):
    """Reached from its consumer side (a post-norm stream, where the norm's output is the
    stream): its input must carry the same new features. A tile does; zero-padding does under
    RMSNorm (0 in, 0 out); the mean never comes out of a norm, so average cannot map back."""
    back = frozenset({"tile"}) | (modes & {"zero"})
    ctx.constrain(node, back, why="its output is the residual stream (post-norm), and only new features it gives back as they came keep it exact")
    if m.fill not in back | {"copy"}:
        ctx.refuse(node, "its output is the residual stream (post-norm), which only " + " or ".join(f"--split {b}" for b in sorted(back)) + " keeps exact")
    if m.fill == "zero":
        _widen_rescaled(ctx, node, m)
    else:
        _tile(ctx, node, m)
    ctx.assign(node.inputs[0], len(ctx.shape(node.name)) - 1, m)


def _tile(ctx, node, m):
    """A uniform k-fold copy keeps the mean, variance and mean square: γ and β copied, eps kept."""
    ctx.remap(node, "weight", 0, m, "copy")
    ctx.remap(node, "bias", 0, m, "copy")


def _widen_rescaled(ctx, node, m):
    """zero / average: the old features' γ × √(n/q) and eps × n/q undo the statistics' change; the
    new features' outputs are 0 (β_new = 0), so the output's new units are zeros, and the
    readers' new columns are free (drawn at random, so training can open the new features)."""
    n, q = m.old_size, m.size
    if not ctx.has_param(node, "weight"):
        ctx.refuse(node, f"it has no weight to carry the √(n/q) rescale that --split {m.fill} needs; use --split tile (a width that is a multiple of {n})")
    ctx.remap(node, "weight", 0, m, "copy", scale_old=math.sqrt(n / q), new_value=NEW_GAMMA)
    ctx.remap(node, "bias", 0, m, "copy", new_value=0.0)
    ctx.set_attr(node, "eps", ctx.attrs(node)["eps"] * n / q)
    ctx.assign(node.name, len(ctx.shape(node.name)) - 1, replace(m, fill="zero", free_new=True))


def _rescale_rule(other: str):
    """Scale the output by a factor through γ and β (a tile in front of a tied head: docs/transformers.md);
    `other` is the exact mode that needs no such help, for the refusals."""

    def rescale(ctx, node, factor):
        readers = ctx.readers(node.name)
        if len(readers) != 1:
            ctx.refuse(node, f"a tied head needs this norm's output divided by k, but {', '.join(map(repr, readers))} read it; use --split {other}")
        if not ctx.scale(node, "weight", factor):
            ctx.refuse(node, f"a tied head needs this norm's output divided by k, and it has no weight to carry that; use --split {other}")
        ctx.scale(node, "bias", factor)

    return rescale


_EPS = float_attr(0.0)  # eps = 0 is allowed (torch accepts it); an all-zero vector then gives NaN

LAYERNORM = register(
    OpDef(
        name="layernorm",
        forward=_layernorm,
        infer_shape=_infer,
        attrs={"eps": Attr(_EPS, 1e-5)},
        params={"weight": Param(optional=True), "bias": Param(optional=True)},
        widen=_widen_rule(frozenset({"tile", "average"})),
        fill_modes=frozenset({"tile", "average"}),
        fill_why="LayerNorm reads the mean and variance of the whole vector: only new features equal to the mean, or a uniform k-fold copy, keep them",
        rescale=_rescale_rule("average"),
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
        widen=_widen_rule(frozenset({"tile", "zero"})),
        fill_modes=frozenset({"tile", "zero"}),
        fill_why="RMSNorm reads the mean square of the whole vector: only zero new features, or a uniform k-fold copy, keep it",
        rescale=_rescale_rule("zero"),
        doc="RMSNorm over the last axis, in float32 at least: weight * x / sqrt(mean(x²) + eps).",
    )
)
