"""chunk: one of ``chunks`` equal parts of its input along an axis (default the last).

It splits a fused projection into its parts: GPT-2's ``c_attn`` gives ``[q | k | v]`` along the
features, so ``chunk`` with ``chunks: 3`` and ``index`` 0, 1, 2 gives q, k and v. Equal parts
only, so the split stays right when a later widening grows all three parts alike.

Refuses widening for now (the default rule of :mod:`.base`): the parts of a fused projection
must grow together, which needs its own rule.
"""

from .base import Attr, OpDef, dim_attr, expect, fmt_shape, int_attr, register, same_range, sample_dim


def _infer(in_shapes, p, a):
    (x,) = in_shapes
    expect(len(x) >= 1, "input must have at least one dimension per sample")
    d = sample_dim(a["dim"], len(x))
    expect(a["chunks"] >= 1, "chunks must be at least 1")
    expect(
        x[d] % a["chunks"] == 0,
        f"axis {a['dim']} of the input {fmt_shape(x)} has {x[d]} entries, which do not split into "
        f"{a['chunks']} equal parts",
    )
    expect(a["index"] < a["chunks"], f"index {a['index']} is out of range for {a['chunks']} chunks (use 0..{a['chunks'] - 1})")
    out = list(x)
    out[d] = x[d] // a["chunks"]
    return tuple(out)


def _forward(xs, p, a):
    x = xs[0]
    size = x.shape[a["dim"]] // a["chunks"]
    return x.narrow(a["dim"], a["index"] * size, size)


CHUNK = register(
    OpDef(
        name="chunk",
        forward=_forward,
        infer_shape=_infer,
        attrs={"chunks": Attr(int_attr(1)), "index": Attr(int_attr(0)), "dim": Attr(dim_attr, -1)},
        value_range=same_range,  # it selects values, it computes none
        doc="Part `index` of `chunks` equal parts along `dim` (the split of a fused q/k/v projection).",
    )
)
