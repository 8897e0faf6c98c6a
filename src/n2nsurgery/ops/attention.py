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

Its units are whole heads, never single features: a plain ``--width`` on a projection is refused
here, and the heads grow by the rules of docs/transformers.md (``heads`` below: KV heads with their query
groups, query heads per group, head_dim with rotary), which widen.py carries out through the
coupled walk with the :class:`~.units.HeadPlan` made here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import ANY_FILL, Attr, AttrError, OpDef, expect, float_attr, fmt_shape, int_attr, register
from .units import HeadPlan, PlanError, UnitMap

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


# ------------------------------------------------------------------------------ growing heads

HEAD_SPLITS = ("equal", "random", "tile", "zero")  # how copied heads share o_proj's columns


def _widen(ctx, node, event):
    """The walk carries out a head plan: each input must arrive with the plan's map, and the
    output then takes the plan's output map (and the node its new attributes)."""
    plan = ctx.head_plan(node)
    if plan is None:
        ctx.refuse(
            node,
            "op 'attention' declares no widening rule for the width of a projection (its units are whole heads "
            "of head_dim features); grow the attention itself: --layer "
            f"{node.name} with --heads N, --kv-heads N or --head-dim N",
        )
    expected = plan.output if event.kind == "output" else plan.inputs[event.index]
    if event.axis != len(ctx.shape(node.name)) - 1 or not event.map.same_as(expected):
        which = "output" if event.kind == "output" else f"input {'qkv'[event.index]}"
        ctx.refuse(node, f"its {which} is reached along another coupled path with a different layout than its heads need")
    if event.kind == "input":
        ctx.assign(node.name, event.axis, plan.output)
        for name, value in plan.attrs.items():
            ctx.set_attr(node, name, value)


def _sizes(a, q_width: int) -> dict:
    h, kv, d = heads(a, q_width)
    sizes = {"num_heads": h, "num_kv_heads": kv, "head_dim": d}
    if a["rope"] is not None:
        sizes["rope_theta"] = a["rope"]["theta"]
    return sizes


def _plan(a, in_shapes, request, split, gen) -> HeadPlan:
    """The plan for one request: {"heads": N} | {"kv_heads": N} | {"head_dim": N}."""
    ((what, n),) = request.items()
    h, kv, d = heads(a, in_shapes[0][1])
    if what == "head_dim":
        return _plan_head_dim(a, h, kv, d, n, split)
    if what == "kv_heads" or kv == h:  # MHA: --heads grows the kv heads with the queries
        return _plan_kv_heads(a, h, kv, d, n, split, gen, what)
    return _plan_group_size(a, h, kv, d, n, split, gen)


def _bigger(what: str, n: int, now: int) -> None:
    if n <= now:
        raise PlanError("", f"--{what.replace('_', '-')} {n} is not larger than the current {now}; heads only grow (fewer heads cannot keep the function): give more than {now}")


def _draw_heads(n: int, width: int, split: str, gen, what: str) -> UnitMap:
    """n → width heads: new heads copy random old heads (``equal``/``random`` shares of o_proj's
    columns), every head k times (``tile``), or copies whose o_proj columns are 0 (``zero``)."""
    if split not in HEAD_SPLITS:
        raise PlanError("", f"--split {split} cannot grow heads exactly (a head is a softmax over its own scores, not a mean of units); use one of {', '.join(HEAD_SPLITS)}")
    if split == "tile":
        if width % n:
            raise PlanError("", f"--split tile copies every head the same number of times, so --{what.replace('_', '-')} must be a multiple of {n} (got {width}); use --split equal for any number")
        return UnitMap.draw(n, width, "equal", gen, "tile")
    m = UnitMap.draw(n, width, "random" if split == "random" else "equal", gen)
    if split == "zero":  # the new heads are copies (so they train), but write nothing yet
        return UnitMap(m.src, (~m.new).to(torch.float64), m.new, n)
    return m


def _queries_follow_kv(kvm: UnitMap, g: int) -> UnitMap:
    """Query head j·g + i reads kv head j: it copies old query head src(j)·g + i, with kv head
    j's share (the replica count of a kv head is its queries' replica count)."""
    src = (kvm.src[:, None] * g + torch.arange(g)).reshape(-1)
    return UnitMap(src, kvm.share.repeat_interleave(g), kvm.new.repeat_interleave(g), kvm.old_size * g, kvm.fill)


def _same_in_every_group(gm: UnitMap, kv: int) -> UnitMap:
    """Query head j·g′ + i copies old query head j·g + src(i): one change, in every group."""
    g = gm.old_size
    src = (torch.arange(kv)[:, None] * g + gm.src).reshape(-1)
    return UnitMap(src, gm.share.repeat(kv), gm.new.repeat(kv), kv * g, gm.fill)


def _head_attrs(a, h2: int, kv2: int) -> dict:
    attrs = {"num_heads": h2}
    if a["num_kv_heads"] is not None and a["num_kv_heads"] != kv2:  # null stays null: = num_heads
        attrs["num_kv_heads"] = kv2
    return attrs


def _plan_kv_heads(a, h, kv, d, n, split, gen, what) -> HeadPlan:
    _bigger(what, n, kv)
    g = h // kv
    kvm = _draw_heads(kv, n, split, gen, what)
    qm = _queries_follow_kv(kvm, g)
    q_rows, kv_rows = qm.blocks(d), kvm.blocks(d)
    old = _sizes(a, h * d)
    new = dict(old, num_heads=n * g, num_kv_heads=n)
    return HeadPlan((q_rows, kv_rows, kv_rows), q_rows, _head_attrs(a, n * g, n), kvm.fill, old, new)


def _plan_group_size(a, h, kv, d, n, split, gen) -> HeadPlan:
    _bigger("heads", n, h)
    if n % kv:
        raise PlanError("", f"--heads {n} is not a multiple of the {kv} kv heads (every kv head serves an equal group of query heads); give a multiple of {kv}, or grow the kv heads with --kv-heads")
    gm = _draw_heads(h // kv, n // kv, split, gen, "heads")
    qm = _same_in_every_group(gm, kv)
    q_rows, kv_rows = qm.blocks(d), UnitMap.identity(kv * d)
    old = _sizes(a, h * d)
    return HeadPlan((q_rows, kv_rows, kv_rows), q_rows, _head_attrs(a, n, kv), gm.fill, old, dict(old, num_heads=n))


def _dim_map(d: int, d2: int, rotary: bool) -> UnitMap:
    """One head's dims d → d2; new dims are 0 (zero fill) and carry no outgoing weight.

    Rotate-half pairs dim i with i + d/2, so with rotary the old halves go to [0, d/2) and
    [d2/2, d2/2 + d/2), keeping every old pair a pair; the new dims pair among themselves.
    """
    kept = torch.cat([torch.arange(d // 2), torch.arange(d2 // 2, d2 // 2 + d // 2)]) if rotary else torch.arange(d)
    src = torch.zeros(d2, dtype=torch.int64).index_copy_(0, kept, torch.arange(d))
    new = torch.ones(d2, dtype=torch.bool).index_fill_(0, kept, False)
    return UnitMap(src, (~new).to(torch.float64), new, d, "zero")


def _plan_head_dim(a, h, kv, d, n, split) -> HeadPlan:
    _bigger("head_dim", n, d)
    if split not in ("equal", "zero"):
        raise PlanError("", f"--split {split} cannot grow head_dim exactly (new dims must be 0 in q, k and v, and rotary pairs dim i with i + head_dim/2, so no dim can be copied); use --split zero (the default here)")
    rotary = a["rope"] is not None
    if rotary and n % 2:
        raise PlanError("", f"rotary (rope) pairs dim i with i + head_dim/2, so --head-dim must be even (got {n}); give {n + 1}")
    dm = _dim_map(d, n, rotary)
    q_rows, kv_rows = UnitMap.cat([dm] * h), UnitMap.cat([dm] * kv)
    old = _sizes(a, h * d)
    new = dict(old, head_dim=n)
    attrs = {"head_dim": n} if a["head_dim"] is not None else {}
    if rotary:  # θ′ = θ^(d′/d): frequency i of the old head is θ′^(-2i/d′) = θ^(-2i/d), unchanged
        new["rope_theta"] = a["rope"]["theta"] ** (n / d)
        attrs["rope"] = dict(a["rope"], theta=new["rope_theta"])
    # The default softmax scale 1/√head_dim (as transformers computes it from head_dim) becomes
    # 1/√d′: q × √(d′/d) keeps every score. An explicit scale stays, and so do the scores.
    gain = math.sqrt(n / d) if a["scale"] is None else 1.0
    return HeadPlan((q_rows, kv_rows, kv_rows), q_rows, attrs, "zero", old, new, gain)


ATTENTION = register(
    OpDef(
        name="attention",
        forward=_forward,
        infer_shape=_infer,
        arity=3,
        attrs=ATTRS,
        value_range=_range,
        widen=_widen,
        heads=_plan,
        fill_modes=ANY_FILL,  # its rule checks every map against the head plan itself
        doc="Scaled dot-product attention of q, k, v (multi-head or grouped-query), causal, optional rotary.",
    )
)
