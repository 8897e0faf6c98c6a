"""attention: multi-head (and grouped-query) scaled dot-product attention, with optional rotary.

Inputs are the projected queries, keys and values of one sequence, ``q [T, num_heads·head_dim]``,
``k`` and ``v [S, num_kv_heads·head_dim]`` (the projections are ordinary ``linear`` nodes, so their
tensors keep the model's own names). Query head ``h`` reads key/value head
``h // (num_heads / num_kv_heads)``: grouped-query attention (GQA) as Llama, Mistral and Qwen2
lay it out; ``num_kv_heads = num_heads`` is plain multi-head attention. The output is
``[T, num_heads·head_dim]``, heads side by side, as an output projection reads it.

``rope: {theta, style: rotate_half}`` rotates q and k by their positions 0..T-1 first, with the
tables computed exactly as Hugging Face's ``LlamaRotaryEmbedding`` computes them (in float32, or
float64 for a float64 run), and applied as ``x·cos + rotate_half(x)·sin``.

Refuses widening for now (the default rule of :mod:`.base`): heads, KV groups and head_dim grow
by the rules of docs/widen.md#transformer-layers, which are not implemented yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Attr, AttrError, OpDef, expect, float_attr, fmt_shape, int_attr, register

ROPE_STYLES = ("rotate_half",)
_ROPE_KEYS = ("theta", "style")


def _optional(parse):
    """An attribute that may be written as null (meaning: its default, derived from the shapes)."""

    def p(v):
        return None if v is None else parse(v)

    return p


def rope_attr(v):
    """``rope: {theta: 10000.0, style: rotate_half}`` (style optional), or null for no rotary."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise AttrError(f"must be a mapping {{theta: NUMBER, style: rotate_half}} or null, got {v!r}")
    for k in v:
        if k not in _ROPE_KEYS:
            raise AttrError(f"has unknown key {k!r} (keys: {', '.join(_ROPE_KEYS)})")
    if "theta" not in v:
        raise AttrError("needs theta (the rotary base, e.g. 10000.0)")
    try:
        theta = float_attr(0.0, exclusive_min=True)(v["theta"])
    except AttrError as e:
        raise AttrError(f"theta {e}") from None
    style = v.get("style", "rotate_half")
    if style not in ROPE_STYLES:
        raise AttrError(f"style must be one of {', '.join(map(repr, ROPE_STYLES))}, got {style!r}")
    return {"theta": theta, "style": style}


def _bool_attr(v):
    if not isinstance(v, bool):  # 1 and "true" are not switches here: only YAML true/false
        raise AttrError(f"must be true or false, got {v!r}")
    return v


ATTRS = {
    "num_heads": Attr(int_attr(1)),
    "num_kv_heads": Attr(_optional(int_attr(1)), None),  # null: num_heads (no grouping)
    "head_dim": Attr(_optional(int_attr(1)), None),  # null: q's width / num_heads
    "causal": Attr(_bool_attr, True),
    "scale": Attr(_optional(float_attr(0.0, exclusive_min=True)), None),  # null: 1/sqrt(head_dim)
    "rope": Attr(rope_attr, None),
}


# ------------------------------------------------------------------------------ the geometry


def heads(attrs, q_width: int) -> tuple:
    """(num_heads, num_kv_heads, head_dim) with the defaults filled in from q's width."""
    h = attrs["num_heads"]
    kv = attrs["num_kv_heads"] if attrs["num_kv_heads"] is not None else h
    d = attrs["head_dim"] if attrs["head_dim"] is not None else q_width // h
    return h, kv, d


def _infer(in_shapes, p, a):
    q, k, v = in_shapes
    for name, s in (("q", q), ("k", k), ("v", v)):
        expect(len(s) == 2, f"input {name} must be [positions, heads·head_dim] per sample, got {fmt_shape(s)}")
    h, kv, d = heads(a, q[1])
    if a["head_dim"] is None:
        expect(q[1] % h == 0, f"q has {q[1]} features, which do not split into num_heads {h} heads; give head_dim")
    expect(
        h % kv == 0,
        f"num_heads {h} is not a multiple of num_kv_heads {kv} (each key/value head serves an equal group of query heads)",
    )
    expect(q[1] == h * d, f"q must be [T, {h * d}] (num_heads {h} × head_dim {d}), got {fmt_shape(q)}")
    for name, s in (("k", k), ("v", v)):
        expect(s[1] == kv * d, f"{name} must be [S, {kv * d}] (num_kv_heads {kv} × head_dim {d}), got {fmt_shape(s)}")
    expect(k[0] == v[0], f"k and v must have the same number of positions, got {fmt_shape(k)} and {fmt_shape(v)}")
    if a["causal"] or a["rope"] is not None:
        why = "causal attention" if a["causal"] else "rotary positions"
        expect(q[0] == k[0], f"{why} needs q and k of the same length, got {fmt_shape(q)} and {fmt_shape(k)}")
    if a["rope"] is not None:
        expect(d % 2 == 0, f"rotary (rope) needs an even head_dim, got {d}")
    return (q[0], h * d)


# ------------------------------------------------------------------------------ rotary


def rope_tables(positions: int, head_dim: int, theta: float, dtype: torch.dtype, device) -> tuple:
    """(cos, sin), each ``[positions, head_dim]``, computed as transformers' default rotary does.

    ``inv_freq = 1 / theta ** (arange(0, d, 2) / d)``, ``freqs = positions ⊗ inv_freq`` and
    ``emb = cat(freqs, freqs)``, all in float32 (in float64 when the run is float64), then cos and
    sin cast to `dtype`. Every step is one correctly rounded operation per entry, as in
    transformers, so the float32 tables are the same bits.
    """
    table = torch.promote_types(dtype, torch.float32)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=table) / head_dim))
    pos = torch.arange(positions, dtype=torch.int64).to(dtype=table)
    freqs = torch.outer(pos, inv_freq).to(device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis: dim i pairs with i + d/2."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[B, heads, T, d]`` rotated by tables ``[T, d]``."""
    return (x * cos) + (rotate_half(x) * sin)


# ------------------------------------------------------------------------------ forward


def _split_heads(x: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """[B, T, n·d] -> [B, n, T, d]."""
    return x.reshape(x.shape[0], x.shape[1], n, d).transpose(1, 2)


def _forward(xs, p, a):
    q, k, v = xs
    h, kv, d = heads(a, q.shape[-1])
    q, k, v = _split_heads(q, h, d), _split_heads(k, kv, d), _split_heads(v, kv, d)
    if a["rope"] is not None:
        cos, sin = rope_tables(q.shape[2], d, a["rope"]["theta"], q.dtype, q.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if kv != h:  # kv head j serves query heads j·group .. j·group + group - 1 (head i reads i // group)
        group = h // kv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = a["scale"] if a["scale"] is not None else d**-0.5  # written as transformers writes it
    out = F.scaled_dot_product_attention(q, k, v, is_causal=a["causal"], scale=scale)
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], h * d)


def _range(ranges, attrs):
    # Each output is a convex combination (softmax weights: non-negative, sum 1) of v's values.
    return ranges[2]


ATTENTION = register(
    OpDef(
        name="attention",
        forward=_forward,
        infer_shape=_infer,
        arity=3,
        attrs=ATTRS,
        value_range=_range,
        doc="Scaled dot-product attention of q, k, v (multi-head or grouped-query), causal, optional rotary.",
    )
)
