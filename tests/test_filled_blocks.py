"""Block-wise filled remaps (zero / average fills, rescaled old units, fixed new values, column
shares) give the bytes of the whole-tensor float32 arithmetic they replace, at any block size."""

from __future__ import annotations

import itertools

import pytest
import torch

import n2nsurgery.remap as W
from n2nsurgery.ops.units import UnitMap


def _whole_tensor(tensor, dim, r):
    """The reference: the whole tensor in float32 (or float64), one cast back at the end."""
    work = W._work_dtype(tensor.dtype)
    original = tensor.to(work)
    out = original.index_select(dim, r.map.src).contiguous()
    new = r.map.new.nonzero().flatten()
    if r.kind == "rows" and r.map.fill == "zero":
        out.index_fill_(dim, new, 0.0)
    elif r.kind == "rows" and r.map.fill == "average" and new.numel():
        mean = original.mean(dim=dim, keepdim=True)
        out.index_copy_(dim, new, mean.expand_as(out.index_select(dim, new)).contiguous())
    if r.scale_old != 1.0:
        old = (~r.map.new).nonzero().flatten()
        out.index_copy_(dim, old, out.index_select(dim, old) * r.scale_old)
    if r.new_value is not None:
        out.index_fill_(dim, new, r.new_value)
    out.mul_(r.factor)
    if r.kind == "cols":
        view = [1] * out.dim()
        view[dim] = r.map.size
        out.mul_(r.map.share.to(work).reshape(view))
    return out.to(tensor.dtype)


CASES = list(itertools.product(
    [torch.bfloat16, torch.float16, torch.float32],
    [(37,), (40, 29), (30, 7, 3)],
    [0, 1],
    ["rows", "cols"],
    ["zero", "average", "tile"],
    [(1.0, None, 1.0), (0.7071, 1.0, 0.5)],
))


@pytest.mark.parametrize("block", [W._BLOCK_ELEMENTS, 50])
def test_blocks_give_the_bytes_of_the_whole_tensor(block, monkeypatch):
    monkeypatch.setattr(W, "_BLOCK_ELEMENTS", block)
    g = torch.Generator().manual_seed(0)
    checked = 0
    for dtype, shape, dim, kind, fill, (scale_old, new_value, factor) in CASES:
        if dim >= len(shape):
            continue
        n = shape[dim]
        src = torch.cat([torch.arange(n), torch.randint(0, n, (5,), generator=g)])
        new = torch.zeros(n + 5, dtype=torch.bool)
        new[n:] = True
        umap = UnitMap(src=src, share=torch.rand(n + 5, generator=g, dtype=torch.float64), new=new, old_size=n, fill=fill)
        r = W.Remap(map=umap, kind=kind, node="x", scale_old=scale_old, new_value=new_value, factor=factor)
        t = torch.randn(shape, generator=g).to(dtype)
        got = W._apply_filled(t, {dim: r}, 0.0, 0, "k")
        assert torch.equal(got, _whole_tensor(t, dim, r)), (dtype, shape, dim, kind, fill, scale_old)
        checked += 1
    assert checked > 100
