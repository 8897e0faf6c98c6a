"""embedding and position_embedding: tables looked up by token id and by position.

``embedding`` reads integer token ids (a model input with an integer dtype and ``high``) and
gives one row of its weight ``[vocab, d]`` per id. ``position_embedding`` gives rows ``0..T-1`` of
its weight ``[positions, d]`` for an input of ``T`` positions (GPT-2's ``wpe``); an ``add`` node
sums it with the token embedding.

Both are producers of d_model: their units are the table's columns (weight dim 1), so
``--layer EMBEDDING --width N`` widens the residual stream, whose coupled group is every writer,
norm and reader of it (docs/transformers.md; the norms decide which fill modes are exact). The token
embedding can start a widening (it has ``units``); the position embedding joins the group
through the ``add`` that sums the two.
"""

import torch.nn.functional as F

from .base import ANY_FILL, OpDef, Param, Units, expect, fmt_shape, register


def _embedding_infer(in_shapes, p, a):
    (ids,) = in_shapes
    w = p["weight"]
    expect(len(w) == 2, f"weight must be 2-D [vocab, d], got {fmt_shape(w)}")
    return tuple(ids) + (w[1],)


def _embedding(xs, p, a):
    ids = xs[0]
    if ids.is_floating_point():
        # Shapes cannot tell ids from floats; the executor reports this as the node's failure.
        raise RuntimeError(
            f"embedding reads integer token ids, got a {str(ids.dtype).removeprefix('torch.')} value; "
            "feed it a model input with an integer dtype and high (e.g. dtype: int64, high: VOCAB)"
        )
    vocab = p["weight"].shape[0]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise RuntimeError(
            f"token id {int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())} is outside the "
            f"table's [0, {vocab}); set the input's high to at most {vocab}"
        )
    return F.embedding(ids, p["weight"])


def _position_infer(in_shapes, p, a):
    (x,) = in_shapes
    w = p["weight"]
    expect(len(x) >= 1, "input must have a position axis (its first axis per sample)")
    expect(len(w) == 2, f"weight must be 2-D [positions, d], got {fmt_shape(w)}")
    expect(
        x[0] <= w[0],
        f"the input has {x[0]} positions but the table holds {w[0]} (weight {fmt_shape(w)}); "
        f"use a sequence length of at most {w[0]}",
    )
    return (x[0], w[1])


def _position(xs, p, a):
    x = xs[0]
    rows = p["weight"][: x.shape[1]]
    # A fresh tensor, one table per sample: params may be views of the input file (see OpDef).
    return rows.unsqueeze(0).repeat(x.shape[0], 1, 1)


def _widen(ctx, node, event):
    """The features (the last axis) are the table's columns; positions cannot grow, and the
    input (ids, or the position axis of whatever position_embedding reads) gives no units."""
    features = len(ctx.shape(node.name)) - 1
    if event.kind == "input":
        if event.axis == 0:
            ctx.refuse(node, "its output has one row per position of its input, and positions cannot be widened")
        return  # position_embedding reads only how many positions its input has
    if event.axis != features:
        ctx.refuse(node, "positions cannot be widened; widen the features (its table's columns)")
    # New columns of the table: zeros (zero), the mean of each row's columns (average), or copies
    ctx.remap(node, "weight", 1, event.map, "rows")


# The table's columns are the units (dim 1 of [vocab, d]); tied to a head, that head reads them.
_UNITS = Units(axis=lambda shape, attrs: len(shape) - 1, rows=("weight",), unit_dim=lambda role: 1)

EMBEDDING = register(
    OpDef(
        name="embedding",
        forward=_embedding,
        infer_shape=_embedding_infer,
        params={"weight": Param()},
        widen=_widen,
        units=_UNITS,
        fill_modes=ANY_FILL,  # a producer: its new columns take any fill
        doc="Token embedding: row ids[t] of weight [vocab, d] for every position t.",
    )
)

POSITION_EMBEDDING = register(
    OpDef(
        name="position_embedding",
        forward=_position,
        infer_shape=_position_infer,
        params={"weight": Param()},
        widen=_widen,
        fill_modes=ANY_FILL,
        doc="Learned position embedding: rows 0..T-1 of weight [positions, d] for an input of T positions.",
    )
)
