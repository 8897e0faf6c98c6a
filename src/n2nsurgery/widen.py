"""Net2WiderNet on a graph: give one linear/conv layer more units, and remap everything coupled.

How a widening works (docs/design.md#the-coupled-walk-and-its-maps, after Torch-Pruning's DepGraph):

1. Draw ONE :class:`UnitMap` for the layer's new width: new unit ``j`` copies old unit
   ``src[j]`` (the first ``n`` map to themselves, the extra ones pick uniformly at random with
   replacement), and ``share[j]`` is the part of the old unit's outgoing weight that replica ``j``
   carries (``1/count`` for ``--split equal``; random proportions summing to one for
   ``--split random``).
2. *Collect the coupled group.* Assigning the map to the layer's output value starts a walk over
   the graph: each op's ``widen`` rule (in its definition in :mod:`n2nsurgery.ops`) says what an
   assigned input or output means for it — pass the map through (activations, batchnorm, pooling,
   depthwise convs), pull other producers in (the other operands of ``add``/``mul``), derive a new
   map (``concat`` shifts it by the segment offset, ``flatten`` expands it into blocks), absorb it
   (a consumer's input weights), or refuse. Every value ends up with at most one map; a second,
   different map for the same value is a coupling we cannot honour, and is refused.
3. Only when the whole group is known are tensors touched: each recorded remap gathers the
   original tensor with its map (rows of producers, columns of consumers scaled by ``share``).

Nothing is guessed: an op without a widening rule refuses.
"""

from __future__ import annotations

import math
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .checkpoint import LazyTensor
from .errors import N2NError, did_you_mean
from .ops import get_op
from .surgery import history_step

SPLITS = ("equal", "random")
PRODUCER_OPS = ("linear", "conv1d", "conv2d", "conv3d")


@dataclass(frozen=True)
class UnitMap:
    """How the units along one axis of one value are laid out after the widening.

    ``src[j]``: the old unit that new unit ``j`` copies. ``share[j]``: the fraction of that old
    unit's outgoing weight which unit ``j`` carries (replicas of one unit sum to 1). ``new[j]``:
    whether unit ``j`` is an added replica (noise goes there, never on an original unit).
    """

    src: torch.Tensor  # int64 [new_size]
    share: torch.Tensor  # float64 [new_size]
    new: torch.Tensor  # bool [new_size]
    old_size: int

    @property
    def size(self) -> int:
        return int(self.src.numel())

    @staticmethod
    def identity(n: int) -> "UnitMap":
        return UnitMap(torch.arange(n), torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.bool), n)

    @staticmethod
    def draw(n: int, width: int, split: str, gen: torch.Generator) -> "UnitMap":
        """The paper's random map g for n → width units, with the outgoing shares for `split`."""
        extra = torch.randint(0, n, (width - n,), generator=gen)
        src = torch.cat([torch.arange(n), extra])
        counts = torch.bincount(src, minlength=n).to(torch.float64)
        if split == "equal":
            share = 1.0 / counts[src]
        else:  # random proportions in each replica group, summing to one: exact, breaks symmetry
            weight = torch.rand(width, generator=gen, dtype=torch.float64) + 0.5
            total = torch.zeros(n, dtype=torch.float64).index_add_(0, src, weight)
            share = weight / total[src]
        new = torch.arange(width) >= n
        return UnitMap(src, share, new, n)

    def same_as(self, other: "UnitMap") -> bool:
        return (
            self.old_size == other.old_size
            and torch.equal(self.src, other.src)
            and torch.equal(self.share, other.share)
            and torch.equal(self.new, other.new)
        )

    @staticmethod
    def cat(parts: list) -> "UnitMap":
        """Maps of consecutive segments (each indexing its own segment) as one map of the whole."""
        offset, srcs, shares, news = 0, [], [], []
        for m in parts:
            srcs.append(m.src + offset)
            shares.append(m.share)
            news.append(m.new)
            offset += m.old_size
        return UnitMap(torch.cat(srcs), torch.cat(shares), torch.cat(news), offset)

    def along(self, old_dims: tuple, axis: int) -> "UnitMap":
        """This map applied to `axis` of a block of `old_dims`, flattened (row-major), as flatten does.

        E.g. channels of a [C, H, W] map flattened into C·H·W features: unit c owns the features
        [c·H·W, (c+1)·H·W), and the new layout keeps that block structure for any H and W.
        """
        new_dims = list(old_dims)
        new_dims[axis] = self.size
        index = torch.arange(math.prod(old_dims)).reshape(old_dims).index_select(axis, self.src)
        view = [1] * len(old_dims)
        view[axis] = self.size
        share = self.share.reshape(view).expand(new_dims)
        new = self.new.reshape(view).expand(new_dims)
        return UnitMap(index.reshape(-1), share.reshape(-1).clone(), new.reshape(-1).clone(), math.prod(old_dims))


@dataclass(frozen=True)
class Event:
    """What happened to a node: its input `index` (kind "input") or its output (kind "output")
    was assigned `map` along `axis` (an index into the one-sample shape)."""

    kind: str
    index: Optional[int]
    axis: int
    map: UnitMap


# How a recorded remap treats the original tensor along one dim:
#   "rows": a producer's outgoing units — gather, and noise on new replicas;
#   "copy": per-unit state that replicas share unchanged (batchnorm statistics, depthwise kernels);
#   "cols": a consumer's incoming weights — gather and multiply by the replica's share.
REMAP_KINDS = ("rows", "copy", "cols")


class WidenContext:
    """The coupled-group walk. Op rules call :meth:`assign`, :meth:`remap`, :meth:`set_attr`,
    :meth:`defer` and :meth:`refuse`; nothing is changed until the walk is complete."""

    def __init__(self, model, layer: str):
        self.model = model
        self.arch = model.arch
        self.layer = layer
        self.assigned: dict = {}  # value -> (axis, UnitMap)
        self.remaps: dict = {}  # tensor key -> {dim: (UnitMap, kind, node name)}
        self.attr_changes: dict = {}  # node -> {attr: value}
        self.members: list = []  # nodes the walk touched, in order
        self._queue: deque = deque()
        self._deferred: dict = {}  # key -> callable, run once the queue is empty
        self._current: Optional[str] = None  # the node whose rule is running
        self._origin: dict = {}  # value -> the node whose rule assigned it (not told again)
        self._remapped_by: dict = {}  # tensor key -> nodes whose rules remapped it (tied tensors)
        self.producers: list = []  # layers whose output units the walk widened (rows remapped)
        self._by_name = {n.name: n for n in self.arch.nodes}
        self._readers: dict = {}
        for n in self.arch.nodes:
            for i, src in enumerate(n.inputs):
                self._readers.setdefault(src, []).append((n, i))

    # ------------------------------------------------------------------ used by op rules

    def shape(self, value: str) -> tuple:
        return self.model.shapes[value]

    def attrs(self, node) -> dict:
        return node.resolved_attrs()

    def refuse(self, node, reason: str):
        name = node if isinstance(node, str) else node.name
        raise N2NError(f"cannot widen {self.layer!r} exactly: at node {name!r}, {reason}")

    def assign(self, value: str, axis: int, umap: UnitMap) -> None:
        """Value `value` has `umap` along `axis`. Idempotent; a different map is a conflict."""
        current = self.assigned.get(value)
        if current is not None:
            if current[0] == axis and current[1].same_as(umap):
                return
            raise N2NError(
                f"cannot widen {self.layer!r} exactly: value {value!r} would need two different unit maps "
                "(it is reached along two coupled paths that lay out its units differently); widen a layer on one path only"
            )
        if value in self.arch.inputs:
            raise N2NError(
                f"cannot widen {self.layer!r}: its units are coupled to model input {value!r} "
                "(e.g. through a residual add), and model inputs cannot grow; widen a layer whose units no input shares"
            )
        if value in self.arch.outputs:
            raise N2NError(
                f"cannot widen {self.layer!r}: the widening reaches model output {value!r}, whose width is the "
                "shape of the function; widen a layer whose units feed another layer before the output"
            )
        self.assigned[value] = (axis, umap)
        self._origin[value] = self._current
        self._queue.append(value)

    def remap(self, node, role: str, dim: int, umap: UnitMap, kind: str) -> None:
        """Record that parameter `role` of `node` is remapped along `dim` (absent optional: skipped)."""
        assert kind in REMAP_KINDS
        key = node.param_key(role)
        if key not in self.model.tensors:
            return
        self._remapped_by.setdefault(key, set()).add(node.name)
        if kind == "rows" and node.name not in self.producers:
            self.producers.append(node.name)  # its units are the group's units (a tied twin too)
        dims = self.remaps.setdefault(key, {})
        if dim in dims:
            old_map, old_kind, _ = dims[dim]
            if old_kind == kind and old_map.same_as(umap):
                return
            raise N2NError(
                f"cannot widen {self.layer!r} exactly: tensor {key!r} (node {node.name!r}) would be remapped twice "
                "along the same axis in different ways (a parameter tied between coupled layers?)"
            )
        dims[dim] = (umap, kind, node.name)

    def set_attr(self, node, name: str, value) -> None:
        self.attr_changes.setdefault(node.name, {})[name] = value

    def defer(self, node, fn: Callable[[], None]) -> None:
        """Run `fn` once nothing else is pending (concat needs all of its inputs' maps first)."""
        self._deferred[node.name] = fn

    # ------------------------------------------------------------------ the walk

    def _dispatch(self, node, event: Event) -> None:
        if node.name not in self.members:
            self.members.append(node.name)
        self._current = node.name
        try:
            get_op(node.op).widen(self, node, event)
        finally:
            self._current = None

    def run(self, root_value: str, axis: int, umap: UnitMap) -> None:
        self.assign(root_value, axis, umap)
        while self._queue or self._deferred:
            while self._queue:
                value = self._queue.popleft()
                ax, m = self.assigned[value]
                origin = self._origin.get(value)  # its rule already knows: don't echo back
                if value in self._by_name and origin != value:
                    self._dispatch(self._by_name[value], Event("output", None, ax, m))
                for reader, i in self._readers.get(value, []):
                    if reader.name != origin:
                        self._dispatch(reader, Event("input", i, ax, m))
            self._pull_in_tied()  # before any concat resolves: a tied layer may feed one of its segments
            if self._deferred and not self._queue:
                name = next(iter(self._deferred))
                self._current = name  # deferred work belongs to that node's rule
                try:
                    self._deferred.pop(name)()
                finally:
                    self._current = None

    def _pull_in_tied(self) -> None:
        """A tensor tied between nodes (two nodes naming one checkpoint key) is remapped for all
        of them or for none. A tied linear/conv whose rows were remapped produces the same units,
        so its output joins the group with the same map (and the walk goes on); any other tie the
        walk did not reach is refused."""
        for key, dims in list(self.remaps.items()):
            rows = [m for m, kind, _ in dims.values() if kind == "rows"]
            for node in self.arch.nodes:
                roles = [r for r in get_op(node.op).params if node.param_key(r) == key]
                if not roles or node.name in self._remapped_by.get(key, ()):
                    continue
                if node.op in PRODUCER_OPS and rows and roles[0] in ("weight", "bias") and self.attrs(node).get("groups", 1) == 1:
                    self.assign(node.name, unit_axis(self.model, node), rows[0])
                else:
                    raise N2NError(
                        f"cannot widen {self.layer!r} exactly: tensor {key!r} is shared with node {node.name!r}, which "
                        "the widening cannot remap the same way; give that node its own copy (params: in the architecture)"
                    )


# ---------------------------------------------------------------------------- applying remaps


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Remapping arithmetic runs in float32 or wider (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _apply(tensor: torch.Tensor, dims: dict, noise: float, seed: int, key: str) -> torch.Tensor:
    """Gather `tensor` along each recorded dim (and scale consumers' columns by the replicas'
    shares), in float32 or wider, and cast back to its dtype."""
    work = _work_dtype(tensor.dtype)
    out = tensor
    for dim in sorted(dims):
        umap, kind, _ = dims[dim]
        out = out.index_select(dim, umap.src)  # a gather is exact in any dtype
    out = out.contiguous()
    if noise == 0:
        # Without noise, only the consumers' columns need arithmetic: scale them a block of rows
        # at a time, so the float32 working copy of a half-precision tensor is one block, not
        # the tensor (elementwise, so the bytes are those of a whole-tensor multiply).
        cols = [(dim, umap) for dim, (umap, kind, _) in sorted(dims.items()) if kind == "cols"]
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
    for dim in sorted(dims):
        umap, kind, _ = dims[dim]
        if kind == "cols":
            view = [1] * out.dim()
            view[dim] = umap.size
            out.mul_(umap.share.to(work).reshape(view))
    if noise > 0:
        # The paper's symmetry-breaking noise on the new replicas' incoming weights only (original
        # units stay exactly the teacher's), relative to the tensor's spread. One generator per
        # tensor, from the seed and the key, so the noise does not depend on evaluation order.
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        for dim, (umap, kind, _) in sorted(dims.items()):
            if kind == "rows" and bool(umap.new.any()) and out.dim() > 1:
                scale = float(tensor.to(work).std()) if tensor.numel() > 1 else 0.0
                rows = umap.new.nonzero().flatten()
                shape = list(out.shape)
                shape[dim] = rows.numel()
                delta = torch.randn(shape, generator=gen, dtype=work) * (noise * scale)
                out.index_add_(dim, rows, delta)
    return out.to(tensor.dtype).contiguous()


def _lazy_remap(model, key: str, dims: dict, noise: float, seed: int) -> LazyTensor:
    """The remapped tensor, computed when it is read (by verification, or by the writer while it
    streams the checkpoint), so a widening never holds every changed tensor at once."""
    dtype, shape = model.tensors.dtype(key), list(model.tensors.shape(key))
    for dim, (umap, _, _) in dims.items():
        shape[dim] = umap.size

    def fetch():
        with model.tensors.mapped(key) as original:  # _apply only reads it, into a new tensor
            return _apply(original, dims, noise, seed, key)

    return LazyTensor(dtype, tuple(shape), fetch)


# ------------------------------------------------------------------------------- the API


@dataclass
class WidenReport:
    layer: str
    old_width: int
    new_width: int
    split: str
    noise: float
    seed: int
    group: list  # producers widened with the shared map (the layer first)
    members: list  # every node the coupled walk touched
    changes: list  # {"key", "old_shape", "new_shape"} for every tensor changed
    attr_changes: dict  # node -> {attr: new value}
    noise_free: Optional[object] = field(default=None, repr=False)  # the exact student, when noise > 0

    def to_dict(self) -> dict:
        return {
            "command": "widen",
            "layer": self.layer,
            "old_width": self.old_width,
            "new_width": self.new_width,
            "split": self.split,
            "noise": self.noise,
            "seed": self.seed,
            "group": list(self.group),
            "members": list(self.members),
            "changes": [dict(c) for c in self.changes],
            "attr_changes": {k: dict(v) for k, v in self.attr_changes.items()},
        }


def unit_axis(model, node) -> int:
    """The axis of `node`'s output that holds its units: features (last) for linear, channels for conv."""
    return len(model.shapes[node.name]) - 1 if node.op == "linear" else 0


def _check_layer(model, layer: str):
    arch = model.arch
    if not arch.has_node(layer):
        if layer in arch.inputs:
            raise N2NError(f"{layer!r} is a model input, not a layer; widen a linear or conv node")
        raise N2NError(f"no node named {layer!r} in the architecture{did_you_mean(layer, arch.node_names())}")
    node = arch.node(layer)
    if node.op not in PRODUCER_OPS:
        hint = _nearest_producer(arch, node)
        where = f"; widen its producer {hint!r} instead" if hint else "; widen a linear or conv node"
        raise N2NError(f"node {layer!r} is a {node.op}, which has no units of its own to add{where}")
    return node


def _nearest_producer(arch, node) -> Optional[str]:
    """Walk single-input nodes upstream to the linear/conv whose units `node` carries."""
    seen = set()
    while node.name not in seen:
        seen.add(node.name)
        if node.op in PRODUCER_OPS:
            return node.name
        if len(node.inputs) != 1 or not arch.has_node(node.inputs[0]):
            return None
        node = arch.node(node.inputs[0])
    return None


def plan_group(model, layer: str, width: int, split: str = "equal", seed: int = 0) -> WidenContext:
    """Collect the coupled group of widening `layer` to `width` units, without changing anything.

    Raises:
        N2NError: the layer cannot be widened, or not exactly.
    """
    node = _check_layer(model, layer)
    axis = unit_axis(model, node)
    n = model.shapes[layer][axis]
    if isinstance(width, bool) or not isinstance(width, int):
        raise N2NError(f"--width must be an integer, got {width!r}")
    if width <= n:
        raise N2NError(
            f"--width {width} is not larger than the current width of {layer!r} ({n}); Net2WiderNet only grows "
            f"layers (narrowing cannot preserve the function): give a width above {n}"
        )
    if split not in SPLITS:
        raise N2NError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    _check_memory(model, layer, width)  # before drawing a map of `width` entries
    gen = torch.Generator().manual_seed(seed)
    ctx = WidenContext(model, layer)
    ctx.run(layer, axis, UnitMap.draw(n, width, split, gen))
    _check_memory(model, layer, width, ctx.remaps)  # before any tensor of the group is built
    return ctx


def widen(model, layer: str, width: int, *, split: str = "equal", noise: float = 0.0, seed: int = 0):
    """Net2WiderNet: give linear/conv `layer` `width` output units, keeping the function exact.

    Every tensor coupled to the layer's units (batchnorm statistics, residual partners, concat
    segments, flatten blocks, depthwise convs, consumers' input weights) is remapped with one
    shared unit map.

    Args:
        model: the teacher (:class:`~n2nsurgery.model.Model`); not modified.
        layer: name of a linear or conv node.
        width: the new number of output units (larger than the current one).
        split: ``"equal"`` (the paper: replicas' outgoing weights divided by the replica count) or
            ``"random"`` (random proportions summing to one: exact, breaks replica symmetry).
        noise: the paper's symmetry-breaking noise, as a fraction of each tensor's standard
            deviation, added to the new replicas' incoming weights only. Not exact when > 0.
        seed: seeds the unit map, the random split and the noise.

    Returns:
        ``(student, report)``: the widened :class:`~n2nsurgery.model.Model` (its history has this
        step appended) and a :class:`WidenReport`.

    Raises:
        N2NError: unknown layer, not a linear/conv, width not larger, or a coupling that cannot
            be preserved exactly.

    Example:
        >>> teacher = n2n.load_model("recipes/mlp.safetensors", "recipes/mlp.yaml")
        >>> student, report = widen(teacher, "fc1", 48)
        >>> report.changes[0]
        {'key': 'fc1.bias', 'old_shape': [32], 'new_shape': [48]}
    """
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise N2NError(f"--noise must be a non-negative number, got {noise!r}")
    ctx = plan_group(model, layer, width, split, seed)
    old_width = ctx.assigned[layer][1].old_size

    def build(noise_level: float):
        changes, report = {}, []
        for key in sorted(ctx.remaps):
            changes[key] = _lazy_remap(model, key, ctx.remaps[key], noise_level, seed)
            report.append({"key": key, "old_shape": list(model.tensors.shape(key)), "new_shape": list(changes[key].shape)})
        arch = model.arch.copy()
        for name, attrs in ctx.attr_changes.items():
            arch.node(name).attrs.update(attrs)
        return arch, changes, report

    args = {"layer": layer, "width": width, "split": split, "noise": noise}
    arch, changes, report = build(noise)
    student = model.replace(arch=arch, tensors=model.tensors.with_changes(changes), step=history_step("widen", args, seed))
    noise_free = None
    if noise > 0:
        arch0, changes0, _ = build(0.0)
        noise_free = model.replace(arch=arch0, tensors=model.tensors.with_changes(changes0), step=history_step("widen", dict(args, noise=0.0), seed))
    group = [layer] + sorted(set(ctx.producers) - {layer})
    return student, WidenReport(
        layer=layer,
        old_width=old_width,
        new_width=width,
        split=split,
        noise=float(noise),
        seed=seed,
        group=group,
        members=list(ctx.members),
        changes=report,
        attr_changes={k: dict(v) for k, v in ctx.attr_changes.items()},
        noise_free=noise_free,
    )


def widen_group(model, layer: str) -> tuple:
    """For `n2n inspect`: (group of producers that widen together, None) or (None, reason refused)."""
    try:
        ctx = plan_group(model, layer, _one_more(model, layer))
    except N2NError as e:
        return None, str(e)
    return [layer] + sorted(set(ctx.producers) - {layer}), None


def _one_more(model, layer: str) -> int:
    node = model.arch.node(layer)
    return model.shapes[layer][unit_axis(model, node)] + 1


def _check_memory(model, layer: str, width: int, remaps: Optional[dict] = None) -> None:
    """Refuse a widening whose new tensors would not fit in memory, before allocating them.

    Without `remaps` (before the walk) the estimate is the layer's own new weight and the unit
    map; with them, every remapped tensor at its new size plus the float64 working copy of the
    largest one (see :func:`_apply`).
    """
    from .guards import check_allocation

    key = model.arch.node(layer).param_key("weight")
    dtype = model.tensors.dtype(key)
    if remaps is None:
        per_unit = math.prod(model.tensors.shape(key)[1:])
        sizes = [width * per_unit]
        total = sizes[0] * (dtype.itemsize + 8) + width * 17  # weight, float64 copy, map
    else:
        sizes, total = [0], 0
        for k, dims in remaps.items():
            shape = list(model.tensors.shape(k))
            for dim, (umap, _, _) in dims.items():
                shape[dim] = umap.size
            sizes.append(math.prod(shape))
            total += sizes[-1] * model.tensors.dtype(k).itemsize
        total += 16 * max(sizes)
    check_allocation(total, f"widening {layer!r} to {width} units", "choose a smaller --width", elements=max(sizes))
