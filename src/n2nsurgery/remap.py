"""Applying a widening's recorded remaps to tensors: gathers, fills, scales and shares.

The coupled walk (:mod:`n2nsurgery.widen`) decides, for every tensor a widening touches, one
:class:`Remap` per dim: which old unit each new unit copies, what share of its outgoing weight a
replica carries, how new units are filled (copies, zeros, means) and which factors apply. This
module turns those records into tensors, lazily (:func:`lazy_remap` is what a widened model's
store holds), in float32 or wider, and a block of rows at a time where it can, so a widening
never holds a whole float32 copy of a large half-precision tensor.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import torch

from .checkpoint import LazyTensor
from .ops.units import UnitMap


@dataclass(frozen=True)
class Remap:
    """One recorded remap of one tensor along one dim (see :data:`REMAP_KINDS`).

    ``scale_old``: factor on the old units' entries (a norm's γ × √(n/q), say); ``new_value``:
    the value of the new units' entries, when they are not gathered (a new γ or β of 0);
    ``factor``: on every entry, last (a norm's γ and β ÷ k in front of a tied head).
    """

    map: UnitMap
    kind: str
    node: str
    scale_old: float = 1.0
    new_value: Optional[float] = None
    factor: float = 1.0

    def plain(self) -> bool:
        return self.scale_old == 1.0 and self.new_value is None and self.factor == 1.0 and self.map.fill in ("copy", "tile")

    def free_columns(self) -> bool:
        """A consumer's new columns that read values known to be 0: drawn at random."""
        return self.kind == "cols" and self.map.free_new and bool(self.map.new.any())


# How a recorded remap treats the original tensor along one dim:
#   "rows": a producer's outgoing units — gather (zero or average new rows in those fill modes),
#           and noise on new replicas;
#   "copy": per-unit state that replicas share unchanged (batchnorm statistics, depthwise kernels);
#   "cols": a consumer's incoming weights — gather and multiply by the replica's share.
REMAP_KINDS = ("rows", "copy", "cols")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Remapping arithmetic runs in float32 or wider (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _apply(tensor: torch.Tensor, dims: dict, noise: float, seed: int, key: str) -> torch.Tensor:
    """Gather `tensor` along each recorded dim (and scale consumers' columns by the replicas'
    shares), in float32 or wider, and cast back to its dtype."""
    if not all(r.plain() for r in dims.values()):
        return _apply_filled(tensor, dims, noise, seed, key)
    work = _work_dtype(tensor.dtype)
    out = tensor
    for dim in sorted(dims):
        out = out.index_select(dim, dims[dim].map.src)  # a gather is exact in any dtype
    out = out.contiguous()
    if noise == 0:
        # Without noise, only the consumers' columns need arithmetic: scale them a block of rows
        # at a time, so the float32 working copy of a half-precision tensor is one block, not
        # the tensor (elementwise, so the bytes are those of a whole-tensor multiply).
        cols = [(dim, r.map) for dim, r in sorted(dims.items()) if r.kind == "cols"]
        if cols and out.dim():
            rows = max(1, (8 << 20) // max(1, out[0].numel() * work.itemsize))
            for i in range(0, out.shape[0], rows):
                block = out[i : i + rows]
                w = block.to(work)  # the block itself when `out` is already in `work`
                for dim, umap in cols:
                    share = umap.share.to(work)[i : i + rows] if dim == 0 else umap.share.to(work)
                    view = [1] * w.dim()
                    view[dim] = share.numel()
                    w.mul_(share.reshape(view))
                block.copy_(w)
        return out
    out = out.to(work)  # a copy, unless the gathers above already made one in this dtype
    _scale_cols(out, dims, work)
    _add_noise(out, tensor, dims, noise, seed, key, work)
    return out.to(tensor.dtype).contiguous()


def _scale_cols(out: torch.Tensor, dims: dict, work: torch.dtype) -> None:
    for dim in sorted(dims):
        r = dims[dim]
        if r.kind == "cols":
            view = [1] * out.dim()
            view[dim] = r.map.size
            out.mul_(r.map.share.to(work).reshape(view))


def _add_noise(out, tensor, dims, noise, seed, key, work) -> None:
    """The paper's symmetry-breaking noise on the new replicas' incoming weights only (original
    units stay exactly the teacher's), relative to the tensor's spread. One generator per tensor,
    from the seed and the key, so the noise does not depend on evaluation order."""
    if noise <= 0:
        return
    gen = _tensor_generator(seed, key)
    for dim, r in sorted(dims.items()):
        umap = r.map
        if r.kind == "rows" and bool(umap.new.any()) and out.dim() > 1:
            scale = float(tensor.to(work).std()) if tensor.numel() > 1 else 0.0
            rows = umap.new.nonzero().flatten()
            shape = list(out.shape)
            shape[dim] = rows.numel()
            delta = torch.randn(shape, generator=gen, dtype=work) * (noise * scale)
            out.index_add_(dim, rows, delta)


def _apply_filled(tensor: torch.Tensor, dims: dict, noise: float, seed: int, key: str) -> torch.Tensor:
    """The general remap: gathers, then per dim the fill mode's new rows (zero, or the mean of
    the old rows), the old entries' scale and a fixed value for new entries; then columns'
    shares and noise. Whole-tensor arithmetic in the working dtype, except in the common case of
    one remapped dim without noise, done a block of rows at a time (:func:`_apply_filled_blocks`)."""
    work = _work_dtype(tensor.dtype)
    if noise == 0 and len(dims) == 1 and tensor.dim() >= 1:
        return _apply_filled_blocks(tensor, *next(iter(dims.items())), work, seed, key)
    out = tensor.to(work)
    for dim in sorted(dims):
        r = dims[dim]
        original = out
        out = out.index_select(dim, r.map.src).contiguous()
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
        if r.factor != 1.0:
            out.mul_(r.factor)
    _scale_cols(out, dims, work)
    for dim, r in sorted(dims.items()):
        if r.free_columns():
            _draw_free(out, dim, r.map.new.nonzero().flatten(), _tensor_generator(seed, "free:" + key), _spread(tensor, work))
    _add_noise(out, tensor, dims, noise, seed, key, work)
    return out.to(tensor.dtype).contiguous()


def _tensor_generator(seed: int, key: str) -> torch.Generator:
    """One generator per tensor (and purpose), from the seed and the key, so what is drawn does
    not depend on evaluation order. (mod 2**64: a generator takes at most 64 bits; small seeds
    derive what they always did.)"""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**64)


def _draw_free(x: torch.Tensor, dim: int, idx: torch.Tensor, gen: torch.Generator, scale: float) -> None:
    """Free columns `idx` of `x` along `dim` (they read zeros): normal, times the tensor's spread."""
    shape = list(x.shape)
    shape[dim] = idx.numel()
    x.index_copy_(dim, idx, torch.randn(shape, generator=gen, dtype=x.dtype) * scale)


def _spread(tensor: torch.Tensor, work: torch.dtype) -> float:
    """The standard deviation of `tensor`'s entries (the scale of its free columns), a slice of
    rows at a time: a whole float32 copy of a large half-precision head would double the peak."""
    if tensor.numel() < 2:
        return 0.0
    flat = tensor.reshape(-1)
    total, squares = 0.0, 0.0
    for i in range(0, flat.numel(), _BLOCK_ELEMENTS):
        x = flat[i : i + _BLOCK_ELEMENTS].to(torch.float64)
        total += float(x.sum())
        squares += float((x * x).sum())
    n = flat.numel()
    mean = total / n
    return max(0.0, (squares - n * mean * mean) / (n - 1)) ** 0.5


# Elements of the float32 working copy held at once by the block-wise remaps (8 MiB).
_BLOCK_ELEMENTS = 2 << 20


def _apply_filled_blocks(tensor: torch.Tensor, dim: int, r, work: torch.dtype, seed: int = 0, key: str = "") -> torch.Tensor:
    """:func:`_apply_filled` for one remapped dim, with the same float32 arithmetic per element
    (so the same bytes), a block of rows (dim 0) at a time: growing d_model touches every large
    tensor of a model (the embedding, the head), and a whole-tensor float32 copy of each, beside
    the gathered copy, would hold several times the largest tensor (peak RSS, docs/scale.md)."""
    out = tensor.index_select(dim, r.map.src).contiguous()  # a gather is exact in any dtype
    new = r.map.new
    mean = _mean_along(tensor, dim, work) if r.kind == "rows" and r.map.fill == "average" and bool(new.any()) else None
    share = r.map.share.to(work) if r.kind == "cols" else None
    free = (_tensor_generator(seed, "free:" + key), _spread(tensor, work)) if r.free_columns() else None
    rows = max(1, _BLOCK_ELEMENTS // max(1, out[0].numel()))
    for i in range(0, out.shape[0], rows):
        block = out[i : i + rows]
        x = block.to(work)  # the block itself when already in the working dtype (`out` is ours)
        sel = slice(i, i + rows) if dim == 0 else slice(None)
        is_new = new[sel]
        new_idx, old_idx = is_new.nonzero().flatten(), (~is_new).nonzero().flatten()
        if r.kind == "rows" and r.map.fill == "zero":
            x.index_fill_(dim, new_idx, 0.0)
        elif mean is not None and new_idx.numel():
            m = mean if dim == 0 else mean[i : i + rows]
            x.index_copy_(dim, new_idx, m.expand_as(x.index_select(dim, new_idx)).contiguous())
        if r.scale_old != 1.0:
            x.index_copy_(dim, old_idx, x.index_select(dim, old_idx) * r.scale_old)
        if r.new_value is not None:
            x.index_fill_(dim, new_idx, r.new_value)
        if r.factor != 1.0:
            x.mul_(r.factor)
        if share is not None:
            view = [1] * x.dim()
            view[dim] = x.shape[dim]
            x.mul_(share[sel].reshape(view))
        if free is not None and new_idx.numel():  # block by block from one generator: deterministic
            _draw_free(x, dim, new_idx, *free)
        block.copy_(x)
    return out


def _mean_along(tensor: torch.Tensor, dim: int, work: torch.dtype) -> torch.Tensor:
    """``tensor.to(work).mean(dim, keepdim=True)`` without a float32 copy of the whole tensor:
    slices along another axis (each slice's means are computed as the whole tensor's are)."""
    if tensor.dim() == 1:
        return tensor.to(work).mean(dim=0, keepdim=True)
    axis = 1 if dim == 0 else 0
    step = max(1, _BLOCK_ELEMENTS // max(1, tensor.numel() // tensor.shape[axis]))
    parts = [tensor.narrow(axis, i, min(step, tensor.shape[axis] - i)).to(work).mean(dim=dim, keepdim=True)
             for i in range(0, tensor.shape[axis], step)]
    return torch.cat(parts, dim=axis)


def _lazy_remap(model, key: str, dims: dict, noise: float, seed: int) -> LazyTensor:
    """The remapped tensor, computed when it is read (by verification, or by the writer while it
    streams the checkpoint), so a widening never holds every changed tensor at once."""
    dtype, shape = model.tensors.dtype(key), list(model.tensors.shape(key))
    for dim, r in dims.items():
        shape[dim] = r.map.size

    def fetch():
        with model.tensors.mapped(key) as original:  # _apply only reads it, into a new tensor
            return _apply(original, dims, noise, seed, key)

    return LazyTensor(dtype, tuple(shape), fetch)
