"""flatten: merge a run of axes into one, as torch.flatten does."""

import math

import torch

from .base import Attr, AttrError, OpDef, expect, register, same_range, sample_dim


def _any_dim(v):
    if not isinstance(v, int) or isinstance(v, bool):
        raise AttrError(f"must be an integer, got {v!r}")
    return v


def flatten_span(rank: int, a) -> tuple:
    """(first, last) one-sample axes merged by flatten, inclusive."""
    expect(a["start_dim"] != 0, "start_dim must not be 0: dimension 0 is the batch")
    s = sample_dim(a["start_dim"], rank)
    e = sample_dim(a["end_dim"], rank)
    expect(s <= e, f"start_dim {a['start_dim']} comes after end_dim {a['end_dim']}")
    return s, e


def _infer(in_shapes, p, a):
    (x,) = in_shapes
    expect(len(x) >= 1, "input must have at least one axis per sample")
    s, e = flatten_span(len(x), a)
    return tuple(x[:s]) + (math.prod(x[s : e + 1]),) + tuple(x[e + 1 :])


FLATTEN = register(
    OpDef(
        name="flatten",
        forward=lambda xs, p, a: torch.flatten(xs[0], a["start_dim"], a["end_dim"]),
        infer_shape=_infer,
        attrs={"start_dim": Attr(_any_dim, 1), "end_dim": Attr(_any_dim, -1)},
        value_range=same_range,
    )
)
