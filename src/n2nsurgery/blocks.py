"""Deepen a transformer: insert a whole pre-norm residual block after a block (docs/transformers.md#deepening-a-transformer-by-a-block).

A pre-norm block reads the residual stream ``h`` and adds its branches back to it::

    r = h + W_o · attn(norm1(h))        (attention branch; absent in an MLP-only block)
    X = r + W_down · mlp(norm2(r))      (MLP branch)

Each branch ends in a *writer* (``o_proj``/``down_proj``, GPT-2's ``attn.c_proj``/``mlp.c_proj``),
a layer whose output is added to the stream. With every writer's weight and bias zero, both
branches add exactly 0, so the new block is the identity wherever it is inserted, whatever the
rest of it holds. Two initialisations of the rest:

* ``copy``: every tensor copied from the block before it (LLaMA-Pro), writers zeroed;
* ``zero``: writers zeroed, norms the identity (γ = 1, β = 0), readers (q/k/v, gate/up, c_attn,
  c_fc) drawn fresh from torch's default uniform ±1/√fan_in with the seed, their biases 0. The
  readers are not zero on purpose: with zero readers AND zero writers no gradient reaches either.

Names follow the block's own numbering: the block after ``model.layers.1`` is ``model.layers.2``,
and every later block moves up by one, node names and checkpoint keys alike
(``model.layers.2.* -> model.layers.3.*``), so the keys are what a Hugging Face model with one
more layer expects. The report's ``renames`` (old node name -> new) lets verification compare each
renumbered node with its original; the new block's nodes exist only in the student.

Example:
    >>> from n2nsurgery.blocks import deepen_block
    >>> teacher = n2n.load_model("recipes/llama-tiny.safetensors")
    >>> student, report = deepen_block(teacher, "model.layers.0", "copy")
    >>> report.new_block, report.renames["model.layers.1"]
    ('model.layers.1', 'model.layers.2')
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from .arch import Architecture, Node
from .checkpoint import LazyTensor
from .errors import N2NError
from .model import graph_index
from .ops import get_op
from .surgery import history_step

MODES = ("copy", "zero")

# A block output node is named <prefix><number>: model.layers.3, transformer.h.0.
_BLOCK_NAME = re.compile(r"^(.*?)(\d+)$")


@dataclass
class Block:
    """A pre-norm residual block found in the graph."""

    name: str  # its output node, e.g. model.layers.1
    prefix: str  # model.layers.
    index: int  # 1
    input: str  # the residual stream it reads (the previous block's output, or the embeddings)
    members: list  # its nodes in graph order: every <name>.* node, and the output node last
    writers: list  # names of the layers whose outputs are added to the stream


@dataclass
class BlockReport:
    """What :func:`deepen_block` did. ``to_dict()`` is the JSON the CLI prints with ``--json``."""

    after: str
    block: str  # copy or zero
    new_block: str  # the new block's output node
    writers: list  # the new block's zeroed writers
    nodes: list = field(default_factory=list)  # [{name, op, in}] of the new nodes
    tensors: list = field(default_factory=list)  # [{key, shape, dtype, init}] of the new tensors
    renames: dict = field(default_factory=dict)  # old node name -> new, for renumbered blocks
    renamed_keys: int = 0  # checkpoint keys renumbered
    renumbered_blocks: list = field(default_factory=list)  # [{from, to}] of the later blocks' outputs
    rewired: list = field(default_factory=list)  # consumers that now read the new block
    outputs: list = field(default_factory=list)  # [{from, to}] model outputs now on the new block
    arch: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "command": "deepen",
            "after": self.after,
            "op": "block",
            "block": self.block,
            "new_block": self.new_block,
            "writers": list(self.writers),
            "nodes": [dict(n) for n in self.nodes],
            "tensors": [dict(t) for t in self.tensors],
            "renames": dict(self.renames),
            "renamed_keys": self.renamed_keys,
            "renumbered_blocks": [dict(b) for b in self.renumbered_blocks],
            "rewired": list(self.rewired),
            "outputs": [dict(o) for o in self.outputs],
            "arch": dict(self.arch),
        }


# ---------------------------------------------------------------------------- finding blocks


def find_block(model, after: str) -> Block:
    """The pre-norm residual block whose output node is `after`, or an N2NError saying why not
    (and which blocks the model has)."""
    arch = model.arch
    if not arch.has_node(after):
        raise N2NError(f"no node named {after!r} to insert a block after{_suggest(model)}")
    m = _BLOCK_NAME.match(after)
    if m is None:
        raise N2NError(f"{after!r} is not a block output (a block's name ends in its number, like model.layers.3){_suggest(model)}")
    try:
        return _analyse(model, after, m.group(1), int(m.group(2)))
    except _NotABlock as e:
        raise N2NError(f"{after!r} is not the output of a pre-norm residual block: {e}{_suggest(model)}") from None


class _NotABlock(Exception):
    pass


def _analyse(model, name: str, prefix: str, index: int) -> Block:
    arch = model.arch
    graph = graph_index(model)
    members = [n for n in arch.nodes if n.name.startswith(name + ".")] + [arch.node(name)]
    inside = {n.name for n in members}
    outside = sorted({i for n in members for i in n.inputs if i not in inside})
    if len(outside) != 1:
        raise _NotABlock(f"its nodes ({name}.*) read {len(outside)} values from outside ({', '.join(outside) or 'none'}), "
                         "where a block reads exactly one, the residual stream")
    for n in members[:-1]:
        foreign = [r.name for r, _ in graph.readers.get(n.name, ()) if r.name not in inside]
        if foreign or n.name in arch.outputs:
            raise _NotABlock(f"its node {n.name!r} is read outside the block ({', '.join(foreign) or 'a model output'})")
    stream, writers = outside[0], []
    for n in members:
        if stream in n.inputs and _is_sum(n):
            if len(n.inputs) != 2:
                raise _NotABlock(f"the residual add {n.name!r} has {len(n.inputs)} inputs, not the stream and one branch")
            branch = n.inputs[1] if n.inputs[0] == stream else n.inputs[0]
            writers.append(_check_writer(model, graph, branch, n.name, inside))
            stream = n.name
    if stream != name:
        raise _NotABlock("its output is not the end of a residual stream (stream + branch adds) through the block")
    return Block(name, prefix, index, outside[0], members, writers)


def _is_sum(node) -> bool:
    insert = get_op(node.op).insert
    return insert is not None and insert.word == "sum"


def _check_writer(model, graph, branch: str, add: str, inside: set) -> str:
    """The layer whose output the residual add `add` adds: zeroing its weight (and bias) must
    make its output 0, and nothing but the add may read it."""
    if branch not in inside or not model.arch.has_node(branch):
        raise _NotABlock(f"the residual add {add!r} adds {branch!r}, which is not a layer of the block")
    node = model.arch.node(branch)
    roles = set(get_op(node.op).params)
    if "weight" not in roles or not roles <= {"weight", "bias"} or len(model.tensors.shape(node.param_key("weight"))) < 2:
        raise _NotABlock(f"the branch added by {add!r} ends in {branch!r} ({node.op}), not in a layer with a weight "
                         "matrix that can be zeroed")
    readers = [r.name for r, _ in graph.readers.get(branch, ())]
    if readers != [add]:
        raise _NotABlock(f"the branch output {branch!r} is read by {', '.join(readers)}, not only by the residual add")
    return branch


def block_names(model) -> list:
    """The block output nodes of `model` (what ``--block`` can insert after), in graph order."""
    found = []
    for node in model.arch.nodes:
        m = _BLOCK_NAME.match(node.name)
        if m is None or not _is_sum(node):
            continue
        try:
            _analyse(model, node.name, m.group(1), int(m.group(2)))
        except (_NotABlock, KeyError):
            continue
        found.append(node.name)
    return found


def _suggest(model) -> str:
    names = block_names(model)
    if not names:
        return "; this model has no pre-norm residual blocks (use --op instead of --block)"
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return f"; blocks in this model: {shown}"


# ---------------------------------------------------------------------------- the surgery


def deepen_block(model, after: str, mode: str = "copy", *, seed: int = 0):
    """Insert a new pre-norm residual block after block `after`, with zero writers (exact).

    Args:
        model: the teacher (not modified).
        after: a block output node (``model.layers.1``, ``transformer.h.0``).
        mode: ``copy`` (a copy of block `after`, writers zeroed) or ``zero`` (writers zero, norms
            the identity, readers fresh random from `seed`).
        seed: seeds the readers of a ``zero`` block.

    Returns:
        ``(student, report)``; ``report.renames`` maps renumbered node names (old -> new).

    Raises:
        N2NError: `after` is not a block output (the message lists the blocks), a bad mode.
    """
    if mode not in MODES:
        raise N2NError(f"--block must be one of {', '.join(MODES)}, got {mode!r}")
    block = find_block(model, after)
    new_name = f"{block.prefix}{block.index + 1}"
    renames = _later_blocks(model.arch.node_names(), block)
    key_renames = _later_blocks(model.tensors.keys(), block)
    nodes, tensors, inits = _new_block(model, block, new_name, mode, seed)
    arch, rewired, outputs = _insert(model.arch, block, nodes, renames, key_renames)
    store = _rename_keys(model.tensors, key_renames).with_changes(tensors)
    args = {"after": after, "block": mode}
    student = model.replace(arch=arch, tensors=store, step=history_step("deepen", args, seed))
    report = BlockReport(
        after=after,
        block=mode,
        new_block=new_name,
        writers=[_renamed(w, block.name, new_name) for w in block.writers],
        nodes=[{"name": n.name, "op": n.op, "in": list(n.inputs)} for n in nodes],
        tensors=[{"key": k, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "init": inits[k]}
                 for k, t in tensors.items()],
        renames=renames,
        renamed_keys=len(key_renames),
        renumbered_blocks=[{"from": o, "to": n} for o, n in renames.items() if o[len(block.prefix):].isdigit()],
        rewired=rewired,
        outputs=outputs,
        arch={"nodes_before": len(model.arch.nodes), "nodes_after": len(arch.nodes),
              "parameters_before": model.parameter_count(), "parameters_after": student.parameter_count()},
    )
    return student, report


def _renamed(name: str, old: str, new: str) -> str:
    """`name` inside block `old` as the same node of block `new`."""
    return new + name[len(old):]


def _later_blocks(names, block: Block) -> dict:
    """old -> new for every name of a block numbered after `block` (its number + 1)."""
    pattern = re.compile(r"^" + re.escape(block.prefix) + r"(\d+)((?:\..*)?)$", re.S)
    out = {}
    for name in names:
        m = pattern.match(name)
        if m and int(m.group(1)) > block.index:
            out[name] = f"{block.prefix}{int(m.group(1)) + 1}{m.group(2)}"
    return out


def _new_block(model, block: Block, new_name: str, mode: str, seed: int) -> tuple:
    """The new block's nodes (reading `block`'s output) and tensors, and how each tensor began."""
    gen = torch.Generator().manual_seed(seed)
    nodes, tensors, inits = [], {}, {}
    for n in block.members:
        name = _renamed(n.name, block.name, new_name)
        inputs = [block.name if i == block.input else _renamed(i, block.name, new_name) for i in n.inputs]
        nodes.append(Node(name, n.op, inputs, dict(n.attrs)))
        for role in get_op(n.op).params:
            key = n.param_key(role)
            if key not in model.tensors:
                continue
            init = _init_of(model, n, role, mode, n.name in block.writers)
            tensors[f"{name}.{role}"] = _make(model, n, key, init, gen)
            inits[f"{name}.{role}"] = init
    return nodes, tensors, inits


def _init_of(model, node, role: str, mode: str, writer: bool) -> str:
    if writer and role in ("weight", "bias"):
        return "zero"
    if mode == "copy":
        return "copy"
    if role == "bias":
        return "zero"
    if role == "weight":
        return "random" if len(model.tensors.shape(node.param_key(role))) >= 2 else "ones"
    return "copy"  # other per-unit state: whatever the source block holds


def _make(model, node, key: str, init: str, gen: torch.Generator):
    dtype, shape = model.tensors.dtype(key), tuple(model.tensors.shape(key))
    if init == "copy":
        return _moved(model.tensors, key)
    if init == "zero":
        return torch.zeros(shape, dtype=dtype)
    if init == "ones":
        return torch.ones(shape, dtype=dtype)
    # torch.nn.Linear's default: U(±1/sqrt(fan_in)); fan_in = weights per output unit, which
    # holds for either layout ([out, in] linear, [in, out] linear_t).
    out_shape = model.shapes[node.name]
    units = get_op(node.op).units
    out = out_shape[units.axis(out_shape, node.resolved_attrs())] if units else out_shape[-1]
    bound = 1.0 / math.sqrt(max(1, math.prod(shape) // out))
    return ((torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound).to(dtype)


def _moved(store, key: str):
    """`key`'s value as a source for another key: a pending change as it is, an untouched tensor
    as a lazy read of its bytes (the writer copies them straight from the input file)."""
    if key in store.changes:
        return store.changes[key]
    base = store.base
    return LazyTensor(base.dtype(key), tuple(base.shape(key)), lambda: base.raw(key), base.span(key))


def _rename_keys(store, key_renames: dict):
    """`store` with keys renumbered. The old keys go first, then the new ones come in: a new key
    is often another block's old one (model.layers.2 -> 3 while 3 -> 4)."""
    if not key_renames:
        return store
    moved = {new: _moved(store, old) for old, new in key_renames.items()}
    return store.with_changes({}, dropped=list(key_renames)).with_changes(moved)


def _insert(arch: Architecture, block: Block, nodes: list, renames: dict, key_renames: dict) -> tuple:
    """A copy of `arch` with later blocks renumbered and `nodes` right after the block's output,
    which the block's outside readers and the model outputs now take from the new block."""
    new = arch.copy()
    last = nodes[-1].name
    inside = {n.name for n in block.members}
    rewired = []
    for node in new.nodes:
        reads_block = block.name in node.inputs and node.name not in inside
        node.inputs = [last if (i == block.name and reads_block) else renames.get(i, i) for i in node.inputs]
        if reads_block:
            rewired.append(renames.get(node.name, node.name))
        node.params = {r: key_renames.get(k, k) for r, k in node.params.items()}
        node.name = renames.get(node.name, node.name)
    outputs = [{"from": o, "to": last} for o in new.outputs if o == block.name]
    new.outputs = [last if o == block.name else renames.get(o, o) for o in new.outputs]
    at = [n.name for n in new.nodes].index(block.name) + 1
    new.nodes[at:at] = nodes
    return new, rewired, outputs


# ---------------------------------------------------------------------------- several blocks


@dataclass
class BlocksReport:
    """What :func:`deepen_blocks` did: one :class:`BlockReport` per new block, and the renames
    from the teacher's names to the student's (for verification)."""

    block: str
    after: list  # the teacher's blocks a new block follows, in graph order
    steps: list = field(default_factory=list)  # BlockReport per insertion, in the order done
    renames: dict = field(default_factory=dict)  # teacher node name -> student node name
    arch: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "command": "deepen",
            "op": "blocks",
            "block": self.block,
            "after": list(self.after),
            "new_blocks": len(self.steps),
            "steps": [s.to_dict() for s in self.steps],
            "renames": dict(self.renames),
            "arch": dict(self.arch),
        }


def every_kth_block(model, every: int) -> list:
    """The blocks after which ``--every K`` inserts: the K-th, 2K-th, ... (LLaMA-Pro's pattern).

    Raises:
        N2NError: K is not a positive integer, or is more than the model's blocks.
    """
    names = block_names(model)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise N2NError(f"--every must be a positive integer, got {every!r}")
    if not names:
        raise N2NError("--every: this model has no pre-norm residual blocks (use --op instead of --block)")
    if every > len(names):
        raise N2NError(f"--every {every}: the model has only {len(names)} blocks; give --every {len(names)} or less")
    return names[every - 1 :: every]


def deepen_blocks(model, after: list, mode: str = "copy", *, seed: int = 0):
    """Insert a new block (as :func:`deepen_block`) after each block in `after` (teacher
    names; a name given twice gets two new blocks after it).

    Insertions run from the last block to the first, so each name in `after` still means the
    teacher's block when its turn comes.

    Returns:
        ``(student, BlocksReport)``; ``report.renames`` maps teacher node names to the student's.
    """
    if not after:
        raise N2NError("no block to insert after")
    order = {name: i for i, name in enumerate(block_names(model))}
    for name in after:
        if name not in order:
            find_block(model, name)  # raises with the reason and the blocks there are
    student, steps = model, []
    where = {t: t for t in model.arch.node_names()}  # teacher name -> its name now
    for name in sorted(after, key=lambda n: order[n], reverse=True):
        student, report = deepen_block(student, name, mode, seed=seed)
        steps.append(report)
        where = {t: report.renames.get(now, now) for t, now in where.items()}
    renames = {t: now for t, now in where.items() if t != now}
    out = BlocksReport(block=mode, after=sorted(after, key=lambda n: order[n]), steps=steps, renames=renames,
                       arch={"nodes_before": len(model.arch.nodes), "nodes_after": len(student.arch.nodes),
                             "parameters_before": model.parameter_count(), "parameters_after": student.parameter_count()})
    return student, out


def history_renames(a, b) -> dict:
    """A's node names -> B's, for a B made from A by block deepenings (read from B's history).

    Only when A's history is where B's begins (B was grown from A, or from a model A was grown
    from alike): the block deepenings after it renumbered later blocks, each as
    :func:`deepen_block` did. Otherwise {} (compare by name, as for any two models).
    """
    ha, hb = list(a.history), list(b.history)
    if len(hb) <= len(ha) or hb[: len(ha)] != ha:
        return {}
    where = {n: n for n in a.arch.node_names()}
    for step in hb[len(ha):]:
        args = step.get("args") if isinstance(step, dict) else None
        if not (isinstance(args, dict) and step.get("op") == "deepen" and args.get("block") and isinstance(args.get("after"), str)):
            continue
        m = _BLOCK_NAME.match(args["after"])
        if m is None:
            return {}
        block = Block(args["after"], m.group(1), int(m.group(2)), "", [], [])
        where = {t: _later_blocks([now], block).get(now, now) for t, now in where.items()}
    return {t: now for t, now in where.items() if t != now}
