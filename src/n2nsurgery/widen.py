"""Net2WiderNet on a graph: give one linear/conv layer more units, and remap everything coupled.

How a widening works (docs/design.md#the-coupled-walk-and-its-maps, after Torch-Pruning's DepGraph):

1. *Collect the coupled group and its constraints.* Assigning a layout to the layer's output
   value starts a walk over the graph: each op's ``widen`` rule (in its definition in
   :mod:`n2nsurgery.ops`) says what an assigned input or output means for it — pass the units
   through (activations, batchnorm, pooling, depthwise convs), pull other producers in (the other
   operands of ``add``/``mul``), derive a new layout (``concat`` shifts it by the segment offset,
   ``flatten`` expands it into blocks), absorb it (a consumer's input weights), or refuse. Every
   member also says what it requires of the unit space (:class:`~n2nsurgery.ops.units.Constraint`:
   the fill modes it stays exact under, from its OpDef's ``fill_modes`` and its rule's
   :meth:`WidenContext.constrain` calls, and the block size its units come in).
2. *Draw one map last.* :func:`~n2nsurgery.ops.units.choose_fill` picks the fill mode every
   member allows (``copy``, the paper's rule, whenever it is allowed), or refuses naming the
   member that forbids the rest; then ONE :class:`UnitMap` is drawn for the layer's new width:
   in ``copy`` mode new unit ``j`` copies old unit ``src[j]`` (the first ``n`` map to themselves,
   the extra ones pick uniformly at random with replacement), and ``share[j]`` is the part of the
   old unit's outgoing weight that replica ``j`` carries (``1/count`` for ``--split equal``;
   random proportions summing to one for ``--split random``).
3. The walk is run again with that map, recording every remap; a second, different map for the
   same value is a coupling we cannot honour, and is refused. Only then are tensors touched: each
   recorded remap gathers the original tensor with its map (rows of producers, columns of
   consumers scaled by ``share``; new rows zero or averaged in those fill modes).

Nothing is guessed: an op without a widening rule refuses. The vocabulary (maps, events,
constraints) lives in :mod:`n2nsurgery.ops.units`, below both this module and the op rules.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from .errors import N2NError, did_you_mean
from .model import graph_index
from .ops import get_op
from .ops.units import FILL_MODES, SPLIT_OF, Constraint, Event, PlanError, UnitMap, UnitSpace, choose_fill
from .remap import REMAP_KINDS, Remap, _lazy_remap
from .surgery import history_step

__all__ = ["UnitMap", "Event", "WidenContext", "WidenReport", "plan_group", "widen", "widen_attention", "widen_group", "widen_info", "unit_axis"]

SPLITS = ("equal", "random")  # the shares of a copy map
# --split: a copy map's shares, or a fill mode asked for by name (docs/transformers.md); None picks one.
SPLIT_WORDS = SPLITS + ("zero", "average", "tile")




class WidenContext:
    """The coupled-group walk, and the API op rules call (nothing else of it is theirs to read).

    Rule API:
        :meth:`shape` (one-sample shape of a value), :meth:`attrs` (a node's resolved
        attributes), :meth:`map_of` (the layout assigned to a value so far), :meth:`assign` (a
        value gets a layout: the walk goes on from there), :meth:`remap` (a parameter follows a
        layout), :meth:`set_attr` (an attribute changes with the width), :meth:`constrain` (what
        this member requires of the unit space), :meth:`defer` (run once the rest of the walk is
        done), :meth:`readers` (who reads a value), :meth:`has_param` (an optional parameter is
        there), :meth:`param_shape` (its shape), :meth:`scale` (a remapped parameter times a factor: an OpDef's ``rescale``) and
        :meth:`refuse`. Nothing is changed until the walk is complete.
    """

    def __init__(self, model, layer: str):
        self.model = model
        self.arch = model.arch
        self.layer = layer
        self.assigned: dict = {}  # value -> (axis, UnitMap); rules use map_of()
        self.remaps: dict = {}  # tensor key -> {dim: Remap}
        self.attr_changes: dict = {}  # node -> {attr: value}
        self._members: dict = {}  # nodes the walk touched, in order (a dict: O(1) membership)
        self.constraints: list = []  # Constraint per member, in the order the walk met them
        self._queue: deque = deque()
        self._deferred: dict = {}  # key -> callable, run once the queue is empty
        self._current: Optional[str] = None  # the node whose rule is running
        self._origin: dict = {}  # value -> the node whose rule assigned it (not told again)
        self._remapped_by: dict = {}  # tensor key -> nodes whose rules remapped it (tied tensors)
        self._tie_checked: set = set()  # tensor keys whose ties were already pulled in
        self.head_plans: dict = {}  # attention node -> the HeadPlan this walk carries out
        self._producers: dict = {}  # layers whose output units the walk widened (rows remapped)
        self._rescales: list = []  # (reader, producer, factor): a tied head's input is scaled (tile)
        self.collecting = False  # the walk with the stand-in layout (collect_space)
        graph = graph_index(model)
        self._by_name = graph.by_name
        self._readers = graph.readers
        self._key_users = graph.key_users

    @property
    def members(self) -> list:
        return list(self._members)

    @property
    def producers(self) -> list:
        return list(self._producers)

    # ------------------------------------------------------------------ used by op rules

    def shape(self, value: str) -> tuple:
        return self.model.shapes[value]

    def attrs(self, node) -> dict:
        return node.resolved_attrs()

    def readers(self, value: str) -> list:
        """The names of the nodes that read `value`."""
        return [reader.name for reader, _ in self._readers.get(value, ())]

    def has_param(self, node, role: str) -> bool:
        """Whether `node` has parameter `role` (an optional one may be absent)."""
        return node.param_key(role) in self.model.tensors

    def param_shape(self, node, role: str) -> Optional[tuple]:
        """The shape of `node`'s parameter `role` (None when an optional one is absent)."""
        return self.model.param_shape(node, role)

    def map_of(self, value: str) -> Optional[tuple]:
        """``(axis, UnitMap)`` assigned to `value` so far, or None."""
        return self.assigned.get(value)

    def head_plan(self, node):
        """The :class:`~n2nsurgery.ops.units.HeadPlan` this walk carries out for `node` (an
        attention whose heads grow), or None: a plain widening reached it."""
        return self.head_plans.get(node if isinstance(node, str) else node.name)

    def refuse(self, node, reason: str):
        name = node if isinstance(node, str) else node.name
        raise N2NError(f"cannot widen {self.layer!r} exactly: at node {name!r}, {reason}")

    def constrain(self, node, modes=None, block: int = 1, why: str = "", groups: int = 1) -> None:
        """This member stays exact only under fill `modes` (None: any), its units come in
        blocks of `block` rows of the widened layer, and in `groups` contiguous groups that
        must all grow alike (a grouped convolution)."""
        name = node if isinstance(node, str) else node.name
        self.constraints.append(Constraint(name, frozenset(modes) if modes is not None else None, block, why, groups))

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

    def remap(self, node, role: str, dim: int, umap: UnitMap, kind: str, *, scale_old: float = 1.0, new_value: Optional[float] = None) -> None:
        """Record that parameter `role` of `node` is remapped along `dim` (absent optional: skipped).

        `scale_old` multiplies the old units' entries; `new_value`, when given, is the new units'
        entries instead of gathers (see :class:`Remap`)."""
        assert kind in REMAP_KINDS
        key = node.param_key(role)
        if key not in self.model.tensors:
            return
        self._remapped_by.setdefault(key, set()).add(node.name)
        if kind == "rows":
            self._producers.setdefault(node.name)  # its units are the group's units (a tied twin too)
        dims = self.remaps.setdefault(key, {})
        entry = Remap(umap, kind, node.name, float(scale_old), new_value)
        if dim in dims:
            old = dims[dim]
            if old.kind == kind and old.map.same_as(umap) and (old.scale_old, old.new_value) == (entry.scale_old, new_value):
                return
            tied = self._reconcile_tie(old, entry)
            if tied is not None:
                dims[dim] = tied
                return
            raise N2NError(
                f"cannot widen {self.layer!r} exactly: tensor {key!r} (node {node.name!r}) would be remapped twice "
                "along the same axis in different ways (a parameter tied between coupled layers?)"
            )
        dims[dim] = entry

    def scale(self, node, role: str, factor: float) -> bool:
        """Multiply every entry of the remapped parameter `role` of `node` by `factor` (after its
        remap). False when the node has no such parameter, or the walk did not remap it."""
        key = node.param_key(role)
        if key not in self.remaps:
            return False
        self.remaps[key] = {d: replace(r, factor=r.factor * factor) for d, r in self.remaps[key].items()}
        return True

    def _reconcile_tie(self, a: Remap, b: Remap) -> Optional[Remap]:
        """One tensor that is a producer's units along a dim (an embedding's d_model columns) and
        a reader's input columns along the same dim (the tied lm_head): one remap must serve
        both, the producer's. That is exact when the reader's new inputs are 0 (its new columns
        are then free: zero-padding, or average expansion behind a norm whose new outputs are
        0), or, for a tile, when the reader's input is divided by k instead of its columns
        (asked of the node before it once the walk is done). None: no remap serves both."""
        rows, cols = (a, b) if a.kind == "rows" else (b, a)
        if (rows.kind, cols.kind) != ("rows", "cols") or rows.scale_old != 1.0 or rows.new_value is not None:
            return None
        if not (torch.equal(rows.map.src, cols.map.src) and torch.equal(rows.map.new, cols.map.new)):
            return None
        if cols.map.fill == "zero" and rows.map.fill in ("zero", "average"):
            return rows
        if cols.map.fill == rows.map.fill == "copy" and self.collecting:  # the stand-in layout
            self.constrain(cols.node, ("zero", "average", "tile"), why=f"its weight is {rows.node!r}'s table, so its columns are that node's units")
            return rows
        if cols.map.fill == rows.map.fill == "tile":
            self._rescales.append((cols.node, rows.node, rows.map.old_size / rows.map.size))
            return rows
        return None

    def _resolve_rescales(self) -> None:
        """A tied reader whose columns are a tile's copies without the 1/k: the node that feeds
        it scales its output by 1/k instead (a norm's γ and β; docs/transformers.md)."""
        for reader, producer, factor in self._rescales:
            node = self._by_name[reader]
            source = self._by_name.get(node.inputs[0]) if len(node.inputs) == 1 else None
            op = get_op(source.op) if source is not None else None
            if op is None or op.rescale is None:
                self.refuse(
                    reader,
                    f"its weight is {producer!r}'s table, so with --split tile its columns are copies that "
                    "cannot also be divided by k, and the node before it cannot divide its input instead; "
                    "use --split zero or --split average",
                )
            op.rescale(self, source, factor)

    def set_attr(self, node, name: str, value) -> None:
        self.attr_changes.setdefault(node.name, {})[name] = value

    def defer(self, node, fn: Callable[[], None]) -> None:
        """Run `fn` once nothing else is pending (concat needs all of its inputs' maps first)."""
        self._deferred[node.name] = fn

    # ------------------------------------------------------------------ the walk

    def _dispatch(self, node, event: Event) -> None:
        op = get_op(node.op)
        if node.name not in self._members:
            self._members[node.name] = None
            self.constraints.append(Constraint(node.name, op.fill_modes, why=op.fill_why))
        self._current = node.name
        try:
            op.widen(self, node, event)
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
                for reader, i in self._readers.get(value, ()):
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
        self._resolve_rescales()

    def _pull_in_tied(self) -> None:
        """A tensor tied between nodes (two nodes naming one checkpoint key) is remapped for all
        of them or for none. A tied layer with units of its own whose rows were remapped produces
        the same units, so its output joins the group with the same map (and the walk goes on);
        any other tie the walk did not reach is refused. Each key is checked once, when first
        remapped (its users come from the graph index, not a scan of every node)."""
        for key in [k for k in self.remaps if k not in self._tie_checked]:
            self._tie_checked.add(key)
            rows = {d: r.map for d, r in self.remaps[key].items() if r.kind == "rows"}
            users: dict = {}
            for node, role in self._key_users.get(key, ()):
                users.setdefault(node.name, (node, []))[1].append(role)
            for node, roles in users.values():
                if node.name in self._remapped_by.get(key, ()):
                    continue
                units = get_op(node.op).units
                # the twin's units must lie along the same dim of the tensor as the producer's
                dim = units.unit_dim(roles[0]) if units is not None else None
                if units is not None and dim in rows and roles[0] in units.rows and units.owns(self.attrs(node)):
                    self.assign(node.name, unit_axis(self.model, node), rows[dim])
                else:
                    raise N2NError(
                        f"cannot widen {self.layer!r} exactly: tensor {key!r} is shared with node {node.name!r}, which "
                        "the widening cannot remap the same way; give that node its own copy (params: in the architecture)"
                    )


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
    heads: Optional[dict] = None  # heads growth: {"grown", "old": sizes, "new": sizes, "fill"}
    fill: str = "copy"  # the fill mode the new units were made in (see ops.units.FILL_MODES)

    def to_dict(self) -> dict:
        d = {
            "command": "widen",
            "layer": self.layer,
            "old_width": self.old_width,
            "new_width": self.new_width,
            "split": self.split,
            "fill": self.fill,
            "noise": self.noise,
            "seed": self.seed,
            "group": list(self.group),
            "members": list(self.members),
            "changes": [dict(c) for c in self.changes],
            "attr_changes": {k: dict(v) for k, v in self.attr_changes.items()},
        }
        if self.heads is not None:  # only on heads growth: other reports keep their bytes
            d["heads"] = dict(self.heads)
        return d


def unit_axis(model, node) -> int:
    """The axis of `node`'s output that holds its units, as its OpDef's ``units`` says
    (features, the last axis, for linear; channels for conv)."""
    return get_op(node.op).units.axis(tuple(model.shapes[node.name]), node.resolved_attrs())


def _has_units(node) -> bool:
    return get_op(node.op).units is not None


def _check_layer(model, layer: str):
    arch = model.arch
    if not arch.has_node(layer):
        if layer in arch.inputs:
            raise N2NError(f"{layer!r} is a model input, not a layer; widen a linear or conv node")
        raise N2NError(f"no node named {layer!r} in the architecture{did_you_mean(layer, arch.node_names())}")
    node = arch.node(layer)
    if not _has_units(node):
        hint = _nearest_producer(model, node)
        where = f"; widen its producer {hint!r} instead" if hint else "; widen a linear or conv node"
        raise N2NError(f"node {layer!r} is a {node.op}, which has no units of its own to add{where}")
    return node


def _nearest_producer(model, node) -> Optional[str]:
    """Walk single-input nodes upstream to the layer with units of its own that `node` carries."""
    by_name = graph_index(model).by_name
    seen = set()
    while node.name not in seen:
        seen.add(node.name)
        if _has_units(node):
            return node.name
        if len(node.inputs) != 1 or node.inputs[0] not in by_name:
            return None
        node = by_name[node.inputs[0]]
    return None


def _layout(n: int, width: int) -> UnitMap:
    """A deterministic stand-in map for the collecting walk (its units' layout, no random draw):
    new unit j copies j mod n."""
    src = torch.arange(width) % n
    counts = torch.bincount(src, minlength=n).to(torch.float64)
    # reciprocal(), not 1.0 / t: the reflected operator's Python wrapper costs more than the
    # division at these sizes, and inspect builds one layout per layer.
    return UnitMap(src, torch.reciprocal(counts[src]), torch.arange(width) >= n, n)


def collect_space(model, layer: str, width: int) -> tuple:
    """Walk the coupled group of `layer` with a stand-in layout and gather its unit space: the
    layer's ``n`` rows in blocks (its own block size, and every member's), and each member's
    constraints. Returns ``(space, ctx)``; ctx knows the group (members, producers, remaps)."""
    node = graph_index(model).by_name[layer]
    units = get_op(node.op).units
    axis = unit_axis(model, node)
    n = model.shapes[layer][axis]
    ctx = WidenContext(model, layer)
    ctx.collecting = True
    ctx.run(layer, axis, _layout(n, width))
    space = UnitSpace(rows=n, block=units.block(node.resolved_attrs()))
    for c in ctx.constraints:
        space.add(c)
    return space, ctx


def _choose(space: UnitSpace, layer: str, width: int, fill: Optional[str]) -> str:
    try:
        return choose_fill(space, width, fill)
    except PlanError as e:
        raise N2NError(f"cannot widen {layer!r} exactly: at node {e.node!r}, {e.reason}") from None


def plan_group(model, layer: str, width: int, split: str = "equal", seed: int = 0, fill: Optional[str] = None) -> WidenContext:
    """Collect the coupled group of widening `layer` to `width` units, without changing anything.

    The group's unit space and constraints are collected first (:func:`collect_space`); then one
    fill mode is chosen (`fill`, or the first of copy, tile, zero, average every member allows),
    ONE map is drawn in it, and the walk records every remap with that map.

    Raises:
        N2NError: the layer cannot be widened, or not exactly (naming the member at fault).
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
    if fill is not None and fill not in FILL_MODES:
        raise N2NError(f"fill mode must be one of {', '.join(FILL_MODES)}, got {fill!r}")
    _check_memory(model, layer, width)  # before drawing a map of `width` entries
    space, _ = collect_space(model, layer, width)
    mode = _choose(space, layer, width, fill)
    gen = torch.Generator().manual_seed(seed)
    ctx = WidenContext(model, layer)
    ctx.run(layer, axis, UnitMap.draw(n, width, split, gen, mode, space.block, space.groups))
    ctx.space, ctx.fill = space, mode
    _check_memory(model, layer, width, ctx.remaps)  # before any tensor of the group is built
    return ctx


def _split_to_fill(split: Optional[str]) -> tuple:
    """--split word → (shares of a copy map, fill mode or None to let the group choose)."""
    if split is None:
        return "equal", None
    if split not in SPLIT_WORDS:
        raise N2NError(f"--split must be one of {', '.join(SPLIT_WORDS)}, got {split!r}")
    if split in SPLITS:
        return split, "copy"
    return "equal", split


def widen(model, layer: str, width: int, *, split: Optional[str] = None, noise: float = 0.0, seed: int = 0):
    """Net2WiderNet: give linear/conv `layer` `width` output units, keeping the function exact.

    Every tensor coupled to the layer's units (batchnorm statistics, residual partners, concat
    segments, flatten blocks, depthwise convs, consumers' input weights) is remapped with one
    shared unit map.

    Args:
        model: the teacher (:class:`~n2nsurgery.model.Model`); not modified.
        layer: name of a node with units of its own (linear, conv, linear_t; an embedding: d_model).
        width: the new number of output units (larger than the current one).
        split: how the new units are made (docs/transformers.md): ``"equal"`` (the paper's copy map: replicas'
            outgoing weights divided by the replica count), ``"random"`` (a copy map, random
            proportions summing to one: exact, breaks replica symmetry), ``"zero"`` (new units
            0: a residual stream through RMSNorm), ``"average"`` (new units carry the mean: a
            stream through LayerNorm), ``"tile"`` (every unit copied k = width/n times), or None:
            the first exact one of equal, zero, average, tile for the group. A mode that
            cannot be exact for the group is refused, naming the modes that would work.
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
    shares, wanted = _split_to_fill(split)
    ctx = plan_group(model, layer, width, shares, seed, wanted)
    _refuse_float8_shares(model, ctx)
    old_width = ctx.map_of(layer)[1].old_size
    split = shares if ctx.fill == "copy" else SPLIT_OF[ctx.fill]  # the word that gives this again

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
        fill=ctx.fill,
    )


def _refuse_float8_shares(model, ctx) -> None:
    """Dividing a consumer's weights among replicas rounds in float8 (2-3 mantissa bits): refuse
    up front rather than fail verification (or, with --no-verify, write an inexact student)."""
    for key, dims in sorted(ctx.remaps.items()):
        dtype = model.tensors.dtype(key)
        if dtype.is_floating_point and dtype.itemsize == 1 and any(r.kind == "cols" for r in dims.values()):
            raise N2NError(
                f"{model.source}: cannot widen {ctx.layer!r} exactly: its replicas share the outgoing weights in {key!r}, "
                f"and {dtype} cannot hold those shares exactly; convert the checkpoint to bfloat16 or float16 first"
            )


def widen_group(model, layer: str) -> tuple:
    """For `n2n inspect`: (group of producers that widen together, None) or (None, reason refused)."""
    info = widen_info(model, layer)
    return info.get("group"), info.get("refused")


def widen_info(model, layer: str) -> dict:
    """What `n2n inspect` says of widening `layer`: ``{"group": [layer, partners...]}``, with
    ``"multiple_of": k`` when only widths that are multiples of k are exact (grouped convs grow
    every group alike; a group that allows only tile grows by whole copies), or ``{"refused": why}``."""
    # The collecting walk alone: the group and every refusal of the structure are known there;
    # drawing the map and walking again would only repeat it (inspect asks for every layer).
    try:
        _check_layer(model, layer)
        first = _one_more(model, layer)
        n = model.shapes[layer][unit_axis(model, graph_index(model).by_name[layer])]
        space, ctx = collect_space(model, layer, first)
        try:
            _choose(space, layer, first, None)
            width, multiple = first, None
        except N2NError as refused:
            width, multiple = _smallest_exact(model, layer, n, space, first, refused)
            space, ctx = collect_space(model, layer, width)
        _check_memory(model, layer, width, ctx.remaps)
    except N2NError as e:
        return {"refused": str(e)}
    info = {"group": [layer] + sorted(set(ctx.producers) - {layer})}
    if multiple is not None:
        info["multiple_of"] = multiple
    return info


def _smallest_exact(model, layer: str, n: int, space: UnitSpace, first: int, refused: N2NError) -> tuple:
    """(a width past `first` that is exact, k) where exact widths are the multiples of k: the
    next multiple of the group's block and groups, else 2n (a tile: multiples of n); or raise
    the first refusal, which says why no width is."""
    step = math.lcm(space.block, space.groups)
    for width, multiple in ((n + step, step), (2 * n, n)):
        if width <= first and multiple == step:
            continue  # the width already refused
        try:
            again, _ = collect_space(model, layer, width)
            _choose(again, layer, width, None)
        except N2NError:
            continue
        return width, multiple
    raise refused


def _one_more(model, layer: str) -> int:
    node = graph_index(model).by_name[layer]
    units = get_op(node.op).units
    return model.shapes[layer][unit_axis(model, node)] + units.block(node.resolved_attrs())


def _check_memory(model, layer: str, width: int, remaps: Optional[dict] = None) -> None:
    """Refuse a widening whose new tensors would not fit in memory, before allocating them.

    Without `remaps` (before the walk) the estimate is the layer's own new weight and the unit
    map; with them, every remapped tensor at its new size plus the float64 working copy of the
    largest one (see :func:`n2nsurgery.remap._apply`).
    """
    from .guards import check_allocation

    node = graph_index(model).by_name[layer]
    key = node.param_key("weight")
    dtype = model.tensors.dtype(key)
    if remaps is None:
        shape = model.tensors.shape(key)
        per_unit = math.prod(shape) // max(1, shape[get_op(node.op).units.unit_dim("weight")])
        sizes = [width * per_unit]
        total = sizes[0] * (dtype.itemsize + 8) + width * 17  # weight, float64 copy, map
    else:
        sizes, total = [0], 0
        for k, dims in remaps.items():
            shape = list(model.tensors.shape(k))
            for dim, r in dims.items():
                shape[dim] = r.map.size
            sizes.append(math.prod(shape))
            total += sizes[-1] * model.tensors.dtype(k).itemsize
        total += 16 * max(sizes)
    check_allocation(total, f"widening {layer!r} to {width} units", "choose a smaller --width", elements=max(sizes))


# ------------------------------------------------------------------------- several layers


_GLOB_CHARS = "*?["


def is_glob(pattern: str) -> bool:
    """Whether a ``--layer`` value is a glob (fnmatch on node names) rather than one name."""
    return any(c in pattern for c in _GLOB_CHARS)


def expand_layers(model, patterns) -> list:
    """The layers ``--layer`` values name, in order, each once: a plain name is itself (checked
    when it is widened); a glob (``model.layers.*.mlp.up_proj``, fnmatch on node names) stands
    for the layers with units of their own that it matches, in graph order.

    Raises:
        N2NError: a glob that matches no node, or only nodes without units (naming close ones).
    """
    from fnmatch import fnmatchcase

    if isinstance(patterns, str):
        patterns = [patterns]
    names = model.arch.node_names()
    out = {}
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise N2NError(f"--layer must be a node name or a glob, got {pattern!r}")
        if not is_glob(pattern):
            out.setdefault(pattern)
            continue
        matches = [n for n in names if fnmatchcase(n, pattern)]
        layers = [n for n in matches if _has_units(graph_index(model).by_name[n])]
        if not layers:
            raise N2NError(_no_match(model, pattern, matches))
        for n in layers:
            out.setdefault(n)
    return list(out)


def _no_match(model, pattern: str, matches: list) -> str:
    if matches:
        shown = ", ".join(repr(m) for m in matches[:4]) + (", ..." if len(matches) > 4 else "")
        return (f"--layer {pattern!r} matches {len(matches)} node(s) ({shown}), but none is a layer with units of its own "
                "(linear or conv); make the glob end at a layer's name, e.g. model.layers.*.mlp.up_proj")
    import difflib
    import re

    # Compare globs with globs: block numbers in the names become *, as users write them.
    names = [n.name for n in model.arch.nodes if _has_units(n)] or model.arch.node_names()
    candidates = list(dict.fromkeys([re.sub(r"(?<=\.)\d+(?=\.|$)", "*", n) for n in names] + names))
    close = difflib.get_close_matches(pattern, candidates, n=3, cutoff=0.6)
    hint = f"; close names: {', '.join(close)}" if close else "; `n2n inspect` lists the layers"
    return f"--layer {pattern!r} matches no node (globs match whole node names, fnmatch-style){hint}"


@dataclass
class MultiWidenReport:
    """What :func:`widen_many` did: one :class:`WidenReport` per coupled group, in order."""

    layers: list  # the --layer values as given (names and globs)
    width: int
    seed: int
    groups: list  # WidenReport per group widened
    skipped: list  # [{"layer", "widened_with"}]: matches already widened with an earlier group's layer
    noise_free: Optional[object] = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {
            "command": "widen",
            "layers": list(self.layers),
            "width": self.width,
            "seed": self.seed,
            "groups": [{k: v for k, v in g.to_dict().items() if k != "command"} for g in self.groups],
            "skipped": [dict(s) for s in self.skipped],
        }


def group_seed(seed: int, index: int) -> int:
    """The seed of the `index`-th group (0-based) of a several-layer widening: the first uses
    `seed` itself (so one layer widens as ``widen`` does), later ones a value derived from it."""
    return seed if index == 0 else (seed * 1_000_003 + index) % 2**63


def widen_many(model, layers, width: int, *, seed: int = 0, **options):
    """Widen several layers to `width` units each, every one as its own coupled group, one after
    another (``--layer`` repeated, or a glob).

    A layer that an earlier layer's group already widened (gate_proj and up_proj of one SwiGLU
    MLP; two writers of one residual stream) is not widened again: it is listed in the report's
    ``skipped`` with the layer it was widened with. The student carries ONE history step; verify
    it once against `model`.

    Args:
        model: the teacher; not modified.
        layers: node names and globs (see :func:`expand_layers`).
        width: the new width of every group.
        seed: group k draws its map from :func:`group_seed` (seed, k).
        options: passed to :func:`widen` for every group (split, noise, ...).

    Returns:
        ``(student, MultiWidenReport)``.

    Example:
        >>> teacher = n2n.load_model("recipes/llama-tiny.safetensors")
        >>> student, report = widen_many(teacher, ["model.layers.*.mlp.up_proj"], 128)
        >>> [g.layer for g in report.groups]
        ['model.layers.0.mlp.up_proj', 'model.layers.1.mlp.up_proj']
    """
    given = [layers] if isinstance(layers, str) else list(layers)
    names = expand_layers(model, given)
    student, groups, skipped, done = model, [], [], {}
    for name in names:
        if name in done:
            skipped.append({"layer": name, "widened_with": done[name]})
            continue
        student, report = widen(student, name, width, seed=group_seed(seed, len(groups)), **options)
        groups.append(report)
        for member in report.group:
            done.setdefault(member, name)
    args = {"layer": given, "width": width, **{k: v for k, v in options.items()}}
    student.history = model.history + [history_step("widen", args, seed)]  # one step, as the user asked for it
    noise_free = None
    if options.get("noise", 0.0) > 0:  # the same maps without noise: what strict verification holds
        noise_free, _ = widen_many(model, given, width, seed=seed, **dict(options, noise=0.0))
    for g in groups:
        g.noise_free = None  # each was relative to the previous group's (noisy) student
    return student, MultiWidenReport(given, width, seed, groups, skipped, noise_free)


# ------------------------------------------------------------------------- attention heads

HEAD_OPTIONS = ("heads", "kv_heads", "head_dim")  # the keyword arguments of widen_attention


def _check_attention(model, attn: str):
    arch = model.arch
    if not arch.has_node(attn):
        raise N2NError(f"no node named {attn!r} in the architecture{did_you_mean(attn, arch.node_names())}")
    node = arch.node(attn)
    if get_op(node.op).heads is None:
        raise N2NError(
            f"node {attn!r} is a {node.op}, which has no heads; --heads, --kv-heads and --head-dim apply to an "
            "attention node (e.g. model.layers.0.self_attn); widen a linear or conv node with --width"
        )
    return node


def _head_request(heads, kv_heads, head_dim) -> dict:
    given = {k: v for k, v in zip(HEAD_OPTIONS, (heads, kv_heads, head_dim)) if v is not None}
    flags = ", ".join("--" + k.replace("_", "-") for k in HEAD_OPTIONS)
    if len(given) != 1:
        got = ", ".join("--" + k.replace("_", "-") for k in given) or "none"
        raise N2NError(f"give exactly one of {flags} per step (got {got}); grow one after the other in two steps (a recipe does it in one run)")
    ((what, n),) = given.items()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise N2NError(f"--{what.replace('_', '-')} must be an integer > 0, got {n!r}")
    return given


def _direct_producer(model, node, index: int):
    """The layer that produces input `index` of attention `node` in its own rows (q_proj, ...).

    Heads are rows of one projection each; a fused projection split by a chunk (GPT-2's c_attn)
    is refused: Hugging Face's GPT-2 ties n_embd to heads × head_dim, so its heads grow only
    with d_model."""
    value = node.inputs[index]
    producer = graph_index(model).by_name.get(value)
    units = get_op(producer.op).units if producer is not None else None
    if units is None or not units.owns(producer.resolved_attrs()):
        what = f"node {value!r} ({producer.op})" if producer is not None else f"input {value!r}"
        raise N2NError(
            f"cannot grow the heads of {node.name!r}: its {'qkv'[index]} comes from {what}, not straight from a "
            "projection of its own (a fused q/k/v projection split by a chunk, as in GPT-2, whose n_embd must "
            "equal heads × head_dim, so its heads grow only with d_model); heads grow where q, k and v are "
            "separate linear layers (Llama, Mistral, Qwen2)"
        )
    return producer


def _scale_query_rows(model, ctx, producer, gain: float) -> None:
    """q × gain: the query projection's rows (weight and bias) scaled by `gain` (head_dim growth
    under the default softmax scale 1/√head_dim)."""
    if gain == 1.0:
        return
    readers = {r.name for r, _ in graph_index(model).readers.get(producer.name, ())}
    if readers != {ctx.layer}:
        others = ", ".join(sorted(readers - {ctx.layer}))
        raise N2NError(
            f"cannot grow the head_dim of {ctx.layer!r}: its queries {producer.name!r} are also read by {others}, and "
            "the queries must be scaled by √(new/old head_dim) for the attention alone; give the attention its own query projection"
        )
    users = graph_index(model).key_users
    for role in get_op(producer.op).units.rows:
        key = producer.param_key(role)
        if key not in ctx.remaps:
            continue
        if len({n.name for n, _ in users.get(key, ())}) > 1:
            raise N2NError(
                f"cannot grow the head_dim of {ctx.layer!r}: tensor {key!r} of its query projection is shared with "
                "another node, and only the queries may be scaled; give the projection its own copy"
            )
        entry = ctx.remaps[key][0]
        ctx.remaps[key][0] = Remap(entry.map, entry.kind, entry.node, entry.scale_old * gain, entry.new_value)


def _check_fill(ctx, attn: str, fill: str) -> None:
    """Every other member of the group must stay exact with new units in mode `fill`."""
    for c in ctx.constraints:
        if c.node != attn and c.modes is not None and fill not in c.modes:
            why = f" ({c.why})" if c.why else ""
            raise N2NError(f"cannot grow the heads of {attn!r} exactly: at node {c.node!r}, new units in fill mode {fill} are not kept exact{why}")


def _is_identity(r: Remap) -> bool:
    m = r.map
    return r.plain() and not bool(m.new.any()) and m.size == m.old_size and torch.equal(m.src, torch.arange(m.size)) and bool((m.share == 1).all())


def _drop_unchanged(ctx) -> None:
    """Tensors the walk remapped with the identity (k and v when only the query groups grow)
    are not changed: leave them out of the student's changes and the report."""
    for key in [k for k, dims in ctx.remaps.items() if all(_is_identity(r) for r in dims.values())]:
        del ctx.remaps[key]


def _head_split(request: dict, split: Optional[str]) -> str:
    """The split a heads growth uses: equal by default; head_dim growth pads each head with zero
    dims, so there the default (and what equal means) is zero."""
    if "head_dim" in request:
        return "zero" if split in (None, "equal") else split
    return "equal" if split is None else split


def plan_heads(model, attn: str, request: dict, split: Optional[str], seed: int):
    """Plan growing attention `attn` by `request` ({heads|kv_heads|head_dim: N}); nothing changes.

    The op's ``heads`` rule makes the plan (a row map for each of q, k, v, the output's map, the
    new attributes, the query gain); the coupled walk starts from the three inputs with their
    maps, remaps the projections' rows and the consumers' columns, and meets the attention,
    which checks every map against the plan. Returns ``(ctx, plan)``.
    """
    node = _check_attention(model, attn)
    producers = [_direct_producer(model, node, i) for i in range(len(node.inputs))]
    split = _head_split(request, split)
    gen = torch.Generator().manual_seed(seed)
    try:
        plan = get_op(node.op).heads(node.resolved_attrs(), [model.shapes[v] for v in node.inputs], request, split, gen)
    except PlanError as e:
        raise N2NError(f"cannot grow the heads of {attn!r} exactly: {e.reason}") from None
    ctx = WidenContext(model, attn)
    ctx.head_plans[attn] = plan
    roots = [(value, len(model.shapes[value]) - 1, m) for value, m in zip(node.inputs, plan.inputs)]
    for value, axis, m in roots[:-1]:
        ctx.assign(value, axis, m)
    ctx.run(*roots[-1])
    _check_fill(ctx, attn, plan.fill)
    _drop_unchanged(ctx)
    _scale_query_rows(model, ctx, producers[0], plan.q_gain)
    _check_memory(model, producers[0].name, plan.inputs[0].size, ctx.remaps)
    return ctx, plan


def widen_attention(model, attn: str, *, heads: Optional[int] = None, kv_heads: Optional[int] = None,
                    head_dim: Optional[int] = None, split: Optional[str] = None, seed: int = 0):
    """Grow the heads of attention node `attn` exactly (docs/transformers.md); give exactly one size.

    Args:
        model: the teacher; not modified.
        attn: an attention node (``model.layers.0.self_attn``).
        heads: query heads N. Multi-head attention (as many kv heads as heads): every head grows,
            kv heads with it. Grouped-query attention: N a multiple of the kv heads, each group
            grows the same way (new query heads copy a query head of their group).
        kv_heads: kv heads N; each new one copies a kv head together with its query group.
        head_dim: dims per head N; with rotary, N even, and the rope theta becomes θ^(N/d).
        split: how copied heads share the output projection's columns: ``equal`` (1/count,
            the default), ``random`` (random proportions summing to one), ``tile`` (every head
            the same number of times), ``zero`` (new heads are copies whose columns are 0).
            head_dim growth pads with zero dims: ``zero`` (its default; ``equal`` means the same).
        seed: seeds which heads are copied and the random split.

    Returns:
        ``(student, report)`` as :func:`widen`; ``report.heads`` has the old and new sizes.

    Raises:
        N2NError: not an attention, not exactly one size, a size not larger, heads not a
            multiple of the kv heads, an odd head_dim with rotary, a fused q/k/v projection.
    """
    request = _head_request(heads, kv_heads, head_dim)
    ctx, plan = plan_heads(model, attn, request, split, seed)
    ((what, n),) = request.items()
    split = _head_split(request, split)
    changes, report = {}, []
    for key in sorted(ctx.remaps):
        changes[key] = _lazy_remap(model, key, ctx.remaps[key], 0.0, seed)
        report.append({"key": key, "old_shape": list(model.tensors.shape(key)), "new_shape": list(changes[key].shape)})
    arch = model.arch.copy()
    for name, attrs in ctx.attr_changes.items():
        arch.node(name).attrs.update(attrs)
    args = {"layer": attn, what: n, "split": split}
    student = model.replace(arch=arch, tensors=model.tensors.with_changes(changes), step=history_step("widen", args, seed))
    key = {"heads": "num_heads", "kv_heads": "num_kv_heads", "head_dim": "head_dim"}[what]
    rows_changed = {r.node for dims in ctx.remaps.values() for r in dims.values() if r.kind == "rows"}
    return student, WidenReport(
        layer=attn,
        old_width=plan.old[key],
        new_width=plan.new[key],
        split=split,
        noise=0.0,
        seed=seed,
        group=[p for p in ctx.producers if p in rows_changed],
        members=list(ctx.members),
        changes=report,
        attr_changes={k: dict(v) for k, v in ctx.attr_changes.items()},
        heads={"grown": key, "old": dict(plan.old), "new": dict(plan.new), "fill": plan.fill},
    )
