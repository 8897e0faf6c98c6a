"""Unit maps, walk events and the plan of a widening: the vocabulary op rules and widen.py share.

This module sits below both :mod:`n2nsurgery.ops` (whose widening rules build and derive maps) and
:mod:`n2nsurgery.widen` (which walks the graph and applies the maps), so neither imports the
other: op modules import from here, widen.py imports from here, and nothing here imports either.

A widening is planned in three steps (docs/design.md#the-coupled-walk-and-its-maps):

1. the coupled walk collects the group and, from each member, its *constraints* on the unit space
   (:class:`Constraint`: the fill modes it allows, the block size its units come in);
2. :func:`choose_fill` picks one fill mode that every member allows (or refuses, naming the
   member that forbids the rest), and :meth:`UnitMap.draw` draws ONE map in that mode;
3. every member remaps its tensors with that map (or a map derived from it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

# How the new units of a widening get their values (docs/design.md#fill-modes):
#   "copy":    Net2WiderNet: new unit j copies a random old unit; replicas share its outgoing
#              weight (equally, or in random proportions: --split equal|random);
#   "tile":    every old unit copied the same number of times (width = k·n), outgoing weight ÷ k;
#   "zero":    new units are 0 (producers' new rows are 0), old units unchanged;
#   "average": new units carry the mean of the old ones (producers' new rows are row means).
FILL_MODES = ("copy", "tile", "zero", "average")

# The order a default widening tries them in (no --split given): the paper's copy wherever it is
# exact (every group that has no norm in it: their results stay what they always were); then
# zero and average, whose new units readers can train freely; tile last, because its replicas
# are exact copies that get identical gradients forever (docs/design.md#net2net-in-one-paragraph: symmetry).
PREFERENCE = ("copy", "zero", "average", "tile")

# The --split word that asks for each fill mode (copy: equal or random shares).
SPLIT_OF = {"copy": "equal", "tile": "tile", "zero": "zero", "average": "average"}


@dataclass(frozen=True)
class UnitMap:
    """How the units along one axis of one value are laid out after the widening.

    ``src[j]``: the old unit that new unit ``j`` copies. ``share[j]``: the fraction of that old
    unit's outgoing weight which unit ``j`` carries (replicas of one unit sum to 1). ``new[j]``:
    whether unit ``j`` is an added unit (noise goes there, never on an original unit). ``fill``:
    the mode the new units were made in (see :data:`FILL_MODES`); for ``zero`` and ``average``
    a producer's new rows are not gathers of ``src`` but zeros or the mean of the old rows.
    ``free_new``: the new units' values are exactly 0 wherever this map reaches (a norm's new
    outputs under zero-padding or averaging), so a consumer's new columns may hold anything:
    they are drawn at random (:mod:`n2nsurgery.remap`), since zero columns reading zero values
    behind zero writers' rows would give every one of them exactly zero gradient forever.
    """

    src: torch.Tensor  # int64 [new_size]
    share: torch.Tensor  # float64 [new_size]
    new: torch.Tensor  # bool [new_size]
    old_size: int
    fill: str = "copy"
    free_new: bool = False

    @property
    def size(self) -> int:
        return int(self.src.numel())

    @staticmethod
    def identity(n: int) -> "UnitMap":
        return UnitMap(torch.arange(n), torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.bool), n)

    @staticmethod
    def draw(n: int, width: int, split: str, gen: torch.Generator, fill: str = "copy", block: int = 1, groups: int = 1) -> "UnitMap":
        """ONE map for n → width units in mode `fill`, units in blocks of `block` rows; with
        `groups`, the units are that many contiguous groups that all grow alike (a grouped
        convolution's): group k's new units copy units of group k and stay in group k's range.

        ``copy`` is the paper's random map g with the outgoing shares for `split` (``equal``:
        1/count; ``random``: random proportions summing to one); the other modes draw nothing.
        """
        if groups != 1:  # every group grows alike: one map of a group's units, laid out per group
            return UnitMap.draw(n // groups, width // groups, split, gen, fill, block).along((groups, n // groups), 1)
        if block != 1:
            return UnitMap.draw(n // block, width // block, split, gen, fill).blocks(block)
        if fill == "copy":
            return _draw_copy(n, width, split, gen)
        new = torch.arange(width) >= n
        if fill == "tile":  # width = k·n: unit j copies j mod n, every unit exactly k times
            return UnitMap(torch.arange(width) % n, torch.full((width,), n / width, dtype=torch.float64), new, n, "tile")
        # zero / average: old units keep their weights (share 1); a consumer's new columns get
        # share 0, so whatever the new units carry (0, or the mean) adds nothing downstream.
        # src of a new unit is only a placeholder for the gather (widen._apply writes the zero or
        # mean rows of producers itself).
        src = torch.cat([torch.arange(n), torch.zeros(width - n, dtype=torch.int64)])
        share = torch.cat([torch.ones(n, dtype=torch.float64), torch.zeros(width - n, dtype=torch.float64)])
        return UnitMap(src, share, new, n, fill)

    def same_as(self, other: "UnitMap") -> bool:
        return (
            self.old_size == other.old_size
            and self.fill == other.fill
            and torch.equal(self.src, other.src)
            and torch.equal(self.share, other.share)
            and torch.equal(self.new, other.new)
        )

    @staticmethod
    def cat(parts: list) -> "UnitMap":
        """Maps of consecutive segments (each indexing its own segment) as one map of the whole."""
        offset, srcs, shares, news = 0, [], [], []
        fills = {m.fill for m in parts if bool(m.new.any())} or {"copy"}
        for m in parts:
            srcs.append(m.src + offset)
            shares.append(m.share)
            news.append(m.new)
            offset += m.old_size
        return UnitMap(torch.cat(srcs), torch.cat(shares), torch.cat(news), offset, _one_fill(fills))

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
        return UnitMap(index.reshape(-1), share.reshape(-1).clone(), new.reshape(-1).clone(), math.prod(old_dims), self.fill)

    def per_group(self, groups: int) -> Optional["UnitMap"]:
        """The map of one group when this map grows `groups` contiguous groups alike (group k's
        new units copy units of group k, in the same pattern for every group, laid out group by
        group); None when it does not."""
        n, width = self.old_size, self.size
        if n % groups or width % groups:
            return None
        b, per = n // groups, width // groups
        inner = UnitMap(self.src[:per], self.share[:per], self.new[:per], b, self.fill)
        if bool(((inner.src < 0) | (inner.src >= b)).any()) or not self.same_as(inner.along((groups, b), 1)):
            return None
        return inner

    def blocks(self, block: int) -> "UnitMap":
        """A map of units to a map of their rows, when each unit is `block` consecutive rows
        (an attention head of head_dim rows, say): unit u's rows [u·block, (u+1)·block)."""
        if block == 1:
            return self
        return self.along((self.old_size, block), 0)


def _one_fill(fills: set) -> str:
    if len(fills) != 1:
        raise ValueError(f"segments of one value were filled in different modes: {sorted(fills)}")
    return next(iter(fills))


def _draw_copy(n: int, width: int, split: str, gen: torch.Generator) -> UnitMap:
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


@dataclass(frozen=True)
class Event:
    """What happened to a node: its input `index` (kind "input") or its output (kind "output")
    was assigned `map` along `axis` (an index into the one-sample shape)."""

    kind: str
    index: Optional[int]
    axis: int
    map: UnitMap


# ---------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Constraint:
    """What one member of the coupled group requires of the unit space.

    ``modes``: the fill modes under which this member stays exact (None: any). ``block``: its
    units come in blocks of this many rows of the widened layer (whole heads, say), so the unit
    count and the new width must be multiples of it. ``why``: said when this member is the one
    that forbids every remaining mode.
    """

    node: str
    modes: Optional[frozenset] = None
    block: int = 1
    why: str = ""
    groups: int = 1  # its units are this many contiguous groups that must all grow alike


@dataclass
class UnitSpace:
    """The unit space of one coupled group: ``count`` units of ``block`` rows each (the widened
    layer's ``n`` rows), and the constraints its members put on it, in the order the walk met
    them."""

    rows: int
    block: int = 1
    constraints: list = None
    groups: int = 1  # contiguous groups of rows that grow alike (grouped convolutions)

    def __post_init__(self):
        if self.constraints is None:
            self.constraints = []

    @property
    def count(self) -> int:
        return self.rows // self.block

    def add(self, c: Constraint) -> None:
        self.constraints.append(c)
        self.block = math.lcm(self.block, c.block)
        self.groups = math.lcm(self.groups, c.groups)


class PlanError(Exception):
    """No map satisfies the group: ``node`` is the member at fault, ``reason`` says why."""

    def __init__(self, node: str, reason: str):
        super().__init__(reason)
        self.node = node
        self.reason = reason


def choose_fill(space: UnitSpace, width: int, wanted: Optional[str] = None) -> str:
    """The one fill mode every member allows (the first of :data:`PREFERENCE` that does, or
    `wanted` when given), for widening ``space.rows`` rows to `width`.

    Raises:
        PlanError: a block size that does not divide the widths, a `wanted` mode some member
            forbids, or no mode left; names the member at fault.
    """
    for c in space.constraints:
        if space.rows % c.block or width % c.block:
            raise PlanError(c.node, f"its units come in blocks of {c.block} rows, so the width must be a multiple of {c.block} (got {width})")
    for c in space.constraints:
        if space.rows % c.groups or width % c.groups:
            why = c.why or f"its units are {c.groups} groups that must all grow alike"
            raise PlanError(c.node, f"{why}, so the width must be a multiple of {c.groups} (got {width}, {space.rows} now)")
    candidates = [wanted] if wanted is not None else list(PREFERENCE)
    note = ""
    if width % space.rows and "tile" in candidates:  # tile copies every unit k times: width = k·n
        candidates.remove("tile")
        note = f"; tile needs a width that is a multiple of {space.rows}"
        if not candidates:  # only tile was asked for
            first = space.constraints[0].node if space.constraints else "?"
            raise PlanError(first, f"--split tile copies every unit k times, so the width must be a multiple of {space.rows} (got {width}){_split_hint(space, width, wanted)}")
    for c in space.constraints:
        if c.modes is None:
            continue
        left = [m for m in candidates if m in c.modes]
        if not left:
            allowed = ", ".join(m for m in FILL_MODES if m in c.modes)
            why = f" ({c.why})" if c.why else ""
            tried = ", ".join(candidates) or "none"
            hint = _split_hint(space, width, wanted)
            raise PlanError(c.node, f"it allows only the fill modes {allowed}{why}, and the rest of the group allows {tried}{note}{hint}")
        candidates = left
    return candidates[0]


@dataclass(frozen=True)
class HeadPlan:
    """How an attention node's heads grow (``--heads``, ``--kv-heads``, ``--head-dim``): the
    op's ``heads`` rule makes it, widen.py carries it out with the coupled walk.

    ``inputs``: the row map of each input (q, k, v) along its last axis (whole heads of
    head_dim rows, or each head's dims); the walk remaps their producers' rows with them.
    ``output``: the map of the output (heads side by side), whose shares the consumers'
    columns take (1/count for a copied head, 0 for a new head under ``zero`` or a new dim).
    ``q_gain``: factor on the query producer's rows (√(d′/d) when the softmax scale follows
    head_dim). ``attrs``: the node's attribute changes. ``fill``: the mode the new units are
    in, for the other members' constraints and the report. ``old``/``new``: the sizes
    (num_heads, num_kv_heads, head_dim, and rope theta when it changes), for the report.
    """

    inputs: tuple
    output: UnitMap
    attrs: dict
    fill: str
    old: dict
    new: dict
    q_gain: float = 1.0


def _split_hint(space: UnitSpace, width: int, wanted: Optional[str]) -> str:
    """'; use --split zero or --split tile': the --split words of the modes the WHOLE group
    allows at this width (said when a requested mode is refused); '' when none would do."""
    if wanted is None:
        return ""
    left = []
    for mode in PREFERENCE:
        if mode == "tile" and width % space.rows:
            continue
        if all(c.modes is None or mode in c.modes for c in space.constraints):
            left.append(f"--split {SPLIT_OF[mode]}")
    return "; use " + " or ".join(left) if left else ""
