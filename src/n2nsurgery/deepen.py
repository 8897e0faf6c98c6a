"""Net2DeeperNet: insert a new layer after a node without changing what the model computes.

Two kinds of insertion (docs/deepen.md, docs/design.md#deepen-and-value-ranges):

* **Identity layer** (``op="linear"`` or ``op="conv"``): ``h ← φ(bn(I · h))``. A linear layer gets
  the identity matrix and a zero bias; a convolution gets a centred delta kernel (index k//2 on
  every spatial axis, odd k, stride 1, padding k//2, groups 1). The optional batchnorm is the
  identity at inference. This is exact only where φ(v) = v for every value the node ``after`` can
  produce, which is proved from the graph: each op declares the range of values it can produce
  (:attr:`~n2nsurgery.ops.base.OpDef.value_range`), and :func:`value_ranges` propagates those
  ranges from the model inputs (unbounded) to every node. ReLU after a ReLU qualifies; sigmoid,
  tanh, silu and gelu never do, and such a request is refused.
* **Residual branch** (``op="residual"``): ``h ← h + W2 · φ(bn(W1 · h))`` with ``W2 = 0`` and a
  zero bias, so the branch adds exactly zero whatever φ is and wherever it is inserted; ``W1``
  gets PyTorch's default (kaiming-uniform) initialisation from a generator seeded by ``seed``.

New nodes and tensors follow state_dict naming (docs/format.md) (``NEW.weight``, ``NEW_bn.running_mean``, ...), are
inserted right after ``after`` in the architecture, and take over ``after``'s consumers and any
model output that named it. The new layer is an ordinary linear/conv node, so it can be widened
afterwards like any other.

Example:
    >>> import n2nsurgery as n2n
    >>> from n2nsurgery.deepen import deepen
    >>> teacher = n2n.load_model("recipes/cnn.safetensors", "recipes/cnn.yaml")
    >>> student, report = deepen(teacher, "relu2", batchnorm=True)
    >>> [n["name"] for n in report.to_dict()["nodes"]]
    ['relu2_deep', 'relu2_deep_bn', 'relu2_deep_relu']
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .arch import Architecture, Node
from .errors import N2NError, did_you_mean
from .ops import activation_names, get_op, insertable
from .ops.base import Interval, fmt_shape
from .surgery import history_step

# The --op words. "linear" and "conv" name the Insert.word of the ops deepen builds (the registry
# picks the op that fits the value: conv1d/2d/3d by rank); "auto" picks linear for a 1-D value and
# conv otherwise; "residual" is a zero-initialised branch joined by the op whose word is "sum".
OPS = ("auto", "linear", "conv", "residual")

# What --batchnorm inserts, and what joins a residual branch (Insert.word of the op).
_NORM_WORD = "batchnorm"
_SUM_WORD = "sum"


def activations() -> tuple:
    """Activations deepen can insert, and copies by default when `after` is one of them: the ops
    whose OpDef declares an ``activation`` rule, in registry order."""
    return activation_names()


def __getattr__(name):
    # ACTIVATIONS was a constant; it is the registry's list now (an op registered later joins it).
    if name == "ACTIVATIONS":
        return activations()
    raise AttributeError(name)


def _default_name():
    """A default name deepen gives: <root>_deep[N], optionally followed by _bn or _<activation>."""
    return re.compile(r"^(.+)_deep\d*(?:_(?:bn|" + "|".join(map(re.escape, activations())) + r"))?$")


@dataclass
class DeepenReport:
    """What :func:`deepen` did. ``to_dict()`` is the JSON the CLI prints with ``--json``."""

    after: str  # the node (or model input) the new layer follows
    op: str  # "linear", "conv1d", "conv2d", "conv3d", or "residual"
    layer: str  # the new linear/conv node initialised to the identity (residual: the W1 node)
    activation: Optional[str]  # the φ inserted, or None
    batchnorm: bool
    kernel_size: Optional[int]  # for conv layers
    hidden: Optional[int]  # residual branch width
    value_range: str  # the proven range of `after`'s values, e.g. "[0, inf]"
    nodes: list = field(default_factory=list)  # [{name, op, in}] of the new nodes, in order
    tensors: list = field(default_factory=list)  # [{key, shape, dtype}] of the new tensors
    rewired: list = field(default_factory=list)  # consumers that now read the new last node
    outputs: list = field(default_factory=list)  # [{from, to}] model outputs now on the new node
    arch: dict = field(default_factory=dict)  # nodes and parameter counts before and after

    def to_dict(self) -> dict:
        return {"command": "deepen", **asdict(self)}


# ------------------------------------------------------------------------------ value ranges


def value_ranges(model, upto: Optional[str] = None) -> dict:
    """The interval every value of `model` provably lies in, by name (inputs and nodes).

    Float model inputs are unbounded; integer inputs lie in ``[0, high - 1]``. Each node's range
    follows from its inputs' ranges by its op's ``value_range`` rule; ops that track nothing
    (linear, conv, batchnorm) give ``[-inf, inf]``. With `upto`, nodes after it (in topological
    order, so none of its ancestors) are left out.

    Example:
        >>> value_ranges(n2n.load_model("recipes/mlp.safetensors", "recipes/mlp.yaml"))["relu1"]
        Interval(lo=0.0, hi=inf)
    """
    arch = model.arch
    ranges = {}
    for name, spec in arch.inputs.items():
        ranges[name] = Interval(0.0, float(spec.high - 1)) if spec.high is not None else Interval()
    for node in arch.nodes:
        op = get_op(node.op)
        ranges[node.name] = op.value_range([ranges[i] for i in node.inputs], node.resolved_attrs())
        if node.name == upto:
            break
    return ranges


def is_identity_on(activation: Optional[str], attrs: dict, r: Interval) -> bool:
    """Whether φ(v) = v for every v in `r` (``None`` is no activation: always), as φ's OpDef
    says (``activation.identity_on``). `attrs` as written; defaults are filled in here."""
    if activation is None:
        return True
    op = get_op(activation)
    if op is None or op.activation is None:
        return False
    return op.activation.identity_on(_resolve(op, attrs), r)


def _resolve(op, attrs: dict) -> dict:
    out = {k: a.default for k, a in op.attrs.items()}
    out.update({k: op.attrs[k].parse(v) if k in op.attrs else v for k, v in attrs.items()})
    return out


# --------------------------------------------------------------------------------- the surgery


def deepen(
    model,
    after: str,
    *,
    op: str = "auto",
    activation: Optional[str] = None,
    kernel_size: int = 3,
    batchnorm: bool = False,
    hidden: Optional[int] = None,
    name: Optional[str] = None,
    seed: int = 0,
    block: Optional[str] = None,
):
    """Insert a new layer after node `after`, initialised so the function is unchanged.

    Args:
        model: the teacher :class:`~n2nsurgery.model.Model` (not modified).
        after: a node or float model input; its consumers and any model output naming it are
            rewired to the new layer.
        op: ``auto`` (linear for a 1-D value or one whose features are on the last axis, such as
            a transformer's [T, d] (:func:`features_last`); conv1d/2d/3d for [C, *spatial]), ``linear``
            (identity matrix over the last axis), ``conv`` (centred delta kernel), or
            ``residual`` (``h + W2·φ(W1·h)`` with ``W2 = 0``).
        activation: φ after the new layer: one of :data:`ACTIVATIONS` or ``"none"``. Default
            (None): identity layers copy `after`'s activation (with its attributes) when `after`
            is an activation node, else none; residual branches use relu.
        kernel_size: odd kernel size of new convolutions; a linear layer refuses any value but
            the default.
        batchnorm: add a batchnorm after the new layer (inside the branch for ``residual``); it
            is the identity at inference: mean 0, variance 1 − eps, weight 1, bias 0.
        hidden: width of a residual branch (default: the width of `after`'s value).
        name: name of the new layer; its batchnorm and activation are ``NAME_bn`` and
            ``NAME_<act>``. For ``residual``, the name of the add node; the branch's nodes are
            ``NAME.fc1``/``NAME.conv1``, ``NAME.bn``, ``NAME.<act>``, ``NAME.fc2``/``NAME.conv2``
            (the state_dict names of a torch submodule). Default: ``<after>_deep``, or
            ``<after>_deep2``, ... when taken.
        seed: seeds the initialisation of a residual branch's ``W1`` (of a ``zero`` block's readers).
        block: ``copy`` or ``zero``: insert a whole pre-norm residual block after block output
            `after` instead of one layer (:func:`n2nsurgery.blocks.deepen_block`; the other
            options must keep their defaults). Later blocks are renumbered; the report's
            ``renames`` maps their old node names to the new ones.

    Returns:
        ``(student, report)``: the new, shape-checked model with a ``deepen`` step appended to
        its history, and a :class:`DeepenReport`.

    Raises:
        N2NError: unknown node, a value no layer fits, an identity + φ that would not be exact,
            an even kernel, a name already taken, a bad ``hidden``.

    Example:
        >>> teacher = n2n.load_model("recipes/mlp.safetensors", "recipes/mlp.yaml")
        >>> student, report = deepen(teacher, "relu1")                      # linear, relu
        >>> student, report = deepen(teacher, "fc2", op="residual", hidden=64)
    """
    if block is not None:
        from .blocks import deepen_block

        _check_block_options(op, activation, kernel_size, batchnorm, hidden, name)
        return deepen_block(model, after, block, seed=seed)
    arch = model.arch
    _check_after(arch, after)
    if op not in OPS:
        raise N2NError(f"--op must be one of {', '.join(OPS)}, got {op!r}{did_you_mean(str(op), OPS)}")
    shape = tuple(model.shapes[after])
    residual = op == "residual"
    layer_def = _pick_layer_op(op, shape, after, features_last(model, after))
    layer_op = layer_def.name
    uses_conv = layer_def.insert.kernel
    _check_kernel(kernel_size, uses_conv, layer_op)
    axis = layer_def.units.axis(shape, {})  # an identity layer's output has its input's shape
    width = shape[axis]
    if batchnorm and axis != 0:
        # batchnorm works on axis 0 of a sample (channels); this linear layer works on the last.
        raise N2NError(
            f"--batchnorm normalises the channel axis, but a linear layer on {after!r} "
            f"({fmt_shape(shape)} per sample) works on the last axis; use --op conv, or drop --batchnorm"
        )
    _check_hidden(hidden, residual)
    phi, phi_attrs = _pick_activation(arch, after, activation, residual)

    ranges = value_ranges(model, upto=after)
    if not residual and not is_identity_on(phi, phi_attrs, ranges[after]):
        raise N2NError(_not_exact_message(after, phi, ranges[after]))

    dtype = _param_dtype(model)
    _check_memory(after, layer_def, width, hidden or width if residual else None, kernel_size, dtype)
    names = _plan_names(model, after, name, residual, layer_def.insert.short, phi, batchnorm)
    if residual:
        nodes, tensors, layer = _residual_branch(
            after, names, layer_def, width, hidden or width, kernel_size, phi, phi_attrs, batchnorm, dtype, seed
        )
    else:
        nodes, tensors, layer = _identity_layer(after, names, layer_def, width, kernel_size, phi, phi_attrs, batchnorm, dtype)

    new_arch, rewired, outputs = _insert(arch, after, nodes)
    args = {
        "after": after,
        "op": op,
        "activation": activation,
        "kernel_size": kernel_size,
        "batchnorm": batchnorm,
        "hidden": hidden,
        "name": names["base"],  # the --name that reproduces this step
    }
    # Old nodes keep their parameters and shapes (the new layers keep `after`'s shape), so only
    # the new nodes are checked: a long recipe of deepen steps stays linear in its step count.
    known = {n: s for n, s in model.shapes.items() if n not in model.arch.inputs}
    student = model.replace(arch=new_arch, tensors=model.tensors.with_changes(tensors), step=history_step("deepen", args, seed),
                            known_shapes=known)
    # What the student adds is known here: no need to count the whole graph again.
    before = model.parameter_count()
    student.remember("parameter_count", before + sum(t.numel() for t in tensors.values() if t.dtype.is_floating_point))
    student.remember("param_dtype", dtype)  # new tensors are all `dtype`: the most common one stays it
    report = DeepenReport(
        after=after,
        op="residual" if residual else layer_op,
        layer=layer,
        activation=phi,
        batchnorm=batchnorm,
        kernel_size=kernel_size if uses_conv else None,
        hidden=(hidden or width) if residual else None,
        value_range=str(ranges[after]),
        nodes=[{"name": n.name, "op": n.op, "in": list(n.inputs)} for n in nodes],
        tensors=[
            {"key": k, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for k, t in tensors.items()
        ],
        rewired=rewired,
        outputs=outputs,
        arch={
            "nodes_before": len(arch.nodes),
            "nodes_after": len(new_arch.nodes),
            "parameters_before": before,
            "parameters_after": student.parameter_count(),
        },
    )
    return student, report


# ------------------------------------------------------------------------------- validation


def _check_after(arch: Architecture, after: str) -> None:
    if arch.has_node(after):
        return
    if after in arch.inputs:
        spec = arch.inputs[after]
        if spec.high is not None:
            raise N2NError(
                f"cannot deepen after input {after!r}: it holds {spec.dtype} indices, which no linear or conv "
                f"layer takes; deepen after a node that produces float values"
            )
        return
    names = list(arch.inputs) + arch.node_names()
    raise N2NError(
        f"no node named {after!r} to deepen after{did_you_mean(after, names)}; `n2n inspect` lists the nodes"
    )


def _check_block_options(op, activation, kernel_size, batchnorm, hidden, name) -> None:
    """--block builds a whole block: the options that shape one new layer do not apply."""
    given = [flag for flag, used in (("--op", op != "auto"), ("--activation", activation is not None),
                                     ("--kernel-size", kernel_size != 3), ("--batchnorm", batchnorm),
                                     ("--hidden", hidden is not None), ("--name", name is not None)) if used]
    if given:
        raise N2NError(f"--block inserts a whole block named after the block it follows, so {', '.join(given)} "
                       f"{'does' if len(given) == 1 else 'do'} not apply; drop {'it' if len(given) == 1 else 'them'}, "
                       "or drop --block to insert one layer")


def features_last(model, value: str) -> bool:
    """Whether `value` holds its features on the last axis ([T, d]: token positions first), so
    ``--op auto`` inserts a linear layer over the last axis there, not a convolution that would
    treat the positions as channels (and mix them once trained).

    Decided from the graph: the nearest layer with units upstream says where the units are (a
    linear's last axis, a conv's axis 0, as its OpDef's ``units`` declares); a value that
    derives from integer token ids before meeting any such layer (an embedding, a norm over it)
    has its features last too. A value from a float input alone: False (the layout is unknown).
    """
    return model.memo("features_last", lambda: _features_last_all(model)).get(value, False)


def _features_last_all(model) -> dict:
    """`features_last` for every value, in one pass in topological order: a layer with units
    decides for itself; any other node inherits from its first input that has decided."""
    decided = {name: True for name, spec in model.arch.inputs.items() if spec.high is not None}
    for node in model.arch.nodes:
        units = get_op(node.op).units
        shape = tuple(model.shapes[node.name])
        if units is not None and shape:
            decided[node.name] = units.axis(shape, node.resolved_attrs()) == len(shape) - 1
            continue
        for i in node.inputs:
            if i in decided:
                decided[node.name] = decided[i]
                break
    return decided


def _pick_layer_op(op: str, shape: tuple, after: str, last_axis: bool = False):
    """The OpDef of the new layer (the W1 of a residual branch): the registry's op for the --op
    word ("linear", or "conv" of the value's rank) that can read `shape`. `last_axis`: the
    value's features are on its last axis (:func:`features_last`), where auto picks linear."""
    rank = len(shape)
    what = f"{after!r} has shape {fmt_shape(shape)} per sample"
    if rank == 0:
        raise N2NError(f"cannot deepen after {after!r}: its value is a scalar per sample, and no layer fits it")
    if op == "linear":
        return insertable("linear", shape)  # over the last axis, like torch.nn.Linear: exact for any rank
    conv = insertable("conv", shape)
    if op == "conv":
        if conv is None:
            alt = "use --op linear" if rank == 1 else "use --op linear (it acts on the last axis)"
            raise N2NError(f"--op conv needs a value [channels, 1 to 3 spatial axes], but {what}; {alt}")
        return conv
    if rank == 1 or last_axis:
        return insertable("linear", shape)
    if conv is not None:
        return conv
    alt = "use --op linear (it acts on the last axis)" if op == "auto" else "deepen after a node with 1 to 4 axes"
    raise N2NError(
        f"--op {op} has no layer for {after!r}, whose value has shape {fmt_shape(shape)} per sample "
        f"(linear takes 1-D features, conv1d/2d/3d take [channels, 1 to 3 spatial axes]); {alt}"
    )


def _check_kernel(kernel_size: int, uses_conv: bool, layer_op: str) -> None:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise N2NError(f"--kernel-size must be an odd positive integer, got {kernel_size!r}")
    if not uses_conv:
        if kernel_size != 3:
            raise N2NError(f"--kernel-size applies to convolutions, but the new layer is {layer_op}; drop --kernel-size")
        return
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise N2NError(
            f"--kernel-size {kernel_size} has no centre, so no delta kernel with padding k//2 keeps the shape "
            f"and the function; use an odd size such as {max(1, kernel_size - 1) if kernel_size > 1 else 1} "
            f"or {kernel_size + 1}"
        )


def _check_hidden(hidden: Optional[int], residual: bool) -> None:
    if hidden is None:
        return
    if not residual:
        raise N2NError("--hidden sets the width of a residual branch; use it with --op residual (an identity layer keeps the width of its input)")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise N2NError(f"--hidden must be a positive integer (the residual branch's width), got {hidden!r}")


def _pick_activation(arch: Architecture, after: str, activation: Optional[str], residual: bool) -> tuple:
    """(φ op name or None, φ attributes as written in YAML)."""
    source = arch.node(after) if arch.has_node(after) else None
    if activation is None:
        if residual:
            return "relu", {}
        if source is not None and source.op in activations():
            return source.op, dict(source.attrs)
        return None, {}
    if activation == "none":
        return None, {}
    if activation not in activations():
        choices = activations() + ("none",)
        raise N2NError(
            f"--activation must be one of {', '.join(choices)}, got {activation!r}{did_you_mean(activation, choices)}"
        )
    # Naming the activation `after` already has keeps its attributes (negative_slope, approximate).
    if source is not None and source.op == activation:
        return activation, dict(source.attrs)
    return activation, {}


def _not_exact_message(after: str, phi: str, r: Interval) -> str:
    alternatives = "use --op residual (exact after any value) or --activation none"
    need = get_op(phi).activation.where
    if need is None:  # φ(v) = v nowhere useful (sigmoid, tanh, silu, gelu)
        return (
            f"an identity layer followed by {phi} after {after!r} would change the function, because "
            f"{phi}(v) ≠ v for the values {after!r} produces ({r}); {alternatives}"
        )
    return (
        f"an identity layer followed by {phi} after {after!r} is not exact: {phi}(v) = v only for {need}, "
        f"but {after!r} can produce values in {r}; {alternatives}"
    )


# ----------------------------------------------------------------------------------- naming


def _plan_names(model, after: str, name: Optional[str], residual: bool, short: str, phi, batchnorm: bool) -> dict:
    """Names of every new node: {"layer", "bn", "act", "out" (residual W2), "last"}, and "base".

    ``last`` is the node whose value replaces `after` for its consumers.
    """

    def plan(base: str) -> dict:
        if residual:
            # Dotted, like the state_dict of a torch submodule: NEW.fc1.weight, NEW.bn.running_var.
            names = {"base": base, "layer": f"{base}.{short}1", "out": f"{base}.{short}2", "last": base}
            if batchnorm:
                names["bn"] = f"{base}.bn"
            if phi is not None:
                names["act"] = f"{base}.{phi}"
            return names
        names = {"base": base, "layer": base, "last": base}
        if batchnorm:
            names["bn"] = names["last"] = f"{base}_bn"
        if phi is not None:
            names["act"] = names["last"] = f"{base}_{phi}"
        return names

    names_in_use = {n.name for n in model.arch.nodes}  # O(1) lookups for the candidates below

    def taken(names: dict) -> Optional[str]:
        """The first planned name (or tensor key) already in the model, else None."""
        for n in dict.fromkeys(names.values()):
            if n in model.arch.inputs or n in names_in_use:
                return n
            for role in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                if f"{n}.{role}" in model.tensors:
                    return f"{n}.{role}"
        return None

    if name is not None:
        if not isinstance(name, str) or not name.strip():
            raise N2NError("--name must be a non-empty node name")
        names = plan(name)
        clash = taken(names)
        if clash is not None:
            what = "a tensor" if clash not in names.values() else ("a model input" if clash in model.arch.inputs else "a node")
            raise N2NError(
                f"--name {name!r} would create {clash!r}, but the model already has {what} of that name; "
                f"choose another --name or leave it out for a unique default"
            )
        return names
    # Deepening after a node an earlier deepen made continues its numbering: relu1_deep_relu
    # gives relu1_deep2, not relu1_deep_relu_deep.
    root = _default_name().match(after)
    stem = root.group(1) if root else after
    for i in range(1, 10_000):
        names = plan(f"{stem}_deep" if i == 1 else f"{stem}_deep{i}")
        if taken(names) is None:
            return names
    raise N2NError(f"no free default name after {after!r}; give one with --name")  # pragma: no cover


# --------------------------------------------------------------------------- building blocks


def _param_dtype(model) -> torch.dtype:
    """The floating dtype most of the model's parameter tensors have (float32 when none)."""
    return model.memo("param_dtype", lambda: _count_param_dtype(model))


def _count_param_dtype(model) -> torch.dtype:
    counts = Counter()
    seen = set()
    for node in model.arch.nodes:
        for role in get_op(node.op).params:
            key = node.param_key(role)
            if key in model.tensors and key not in seen:
                seen.add(key)
                dt = model.tensors.dtype(key)
                if dt.is_floating_point:
                    counts[dt] += 1
    if not counts:
        return torch.float32
    order = [torch.float32, torch.float64, torch.float16, torch.bfloat16]  # ties: the first listed
    return max(counts, key=lambda dt: (counts[dt], -order.index(dt) if dt in order else -99))


def _layer_node(name: str, layer_def, src: str, kernel_size: int) -> Node:
    return Node(name=name, op=layer_def.name, inputs=[src], attrs=layer_def.insert.attrs(kernel_size))


def _identity_batchnorm(name: str, src: str, width: int, dtype: torch.dtype) -> tuple:
    """A norm that is the identity at inference (its OpDef's ``insert.identity``), and its tensors."""
    norm = insertable(_NORM_WORD)
    node = Node(name=name, op=norm.name, inputs=[src])
    tensors = {f"{name}.{role}": t for role, t in norm.insert.identity(width, None, dtype).items()}
    return node, tensors


def _identity_layer(after, names, layer_def, width, kernel_size, phi, phi_attrs, batchnorm, dtype) -> tuple:
    """Nodes and tensors of ``φ(bn(I · h))``; returns (nodes, tensors, layer name)."""
    layer = names["layer"]
    nodes = [_layer_node(layer, layer_def, after, kernel_size)]
    tensors = {f"{layer}.{role}": t for role, t in layer_def.insert.identity(width, kernel_size, dtype).items()}
    if batchnorm:
        bn, bn_tensors = _identity_batchnorm(names["bn"], nodes[-1].name, width, dtype)
        nodes.append(bn)
        tensors.update(bn_tensors)
    if phi is not None:
        nodes.append(Node(name=names["act"], op=phi, inputs=[nodes[-1].name], attrs=dict(phi_attrs)))
    return nodes, tensors, layer


def _kaiming_uniform(shape: tuple, gen: torch.Generator) -> tuple:
    """torch.nn.Linear/ConvNd default init: weight and bias ~ U(±1/sqrt(fan_in)), in float32."""
    fan_in = math.prod(shape[1:])
    bound = 1.0 / math.sqrt(fan_in)
    weight = (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
    bias = (torch.rand((shape[0],), generator=gen, dtype=torch.float32) * 2 - 1) * bound
    return weight, bias


def _residual_branch(after, names, layer_def, width, hidden, kernel_size, phi, phi_attrs, batchnorm, dtype, seed) -> tuple:
    """Nodes and tensors of ``h + W2 · φ(bn(W1 · h))`` with W2 = 0; returns (nodes, tensors, W1's name)."""
    weight_shape = layer_def.insert.weight_shape
    first, second = names["layer"], names["out"]
    gen = torch.Generator().manual_seed(seed)
    w1, b1 = _kaiming_uniform(weight_shape(hidden, width, kernel_size), gen)
    nodes = [_layer_node(first, layer_def, after, kernel_size)]
    tensors = {f"{first}.weight": w1.to(dtype), f"{first}.bias": b1.to(dtype)}
    if batchnorm:
        bn, bn_tensors = _identity_batchnorm(names["bn"], first, hidden, dtype)
        nodes.append(bn)
        tensors.update(bn_tensors)
    if phi is not None:
        nodes.append(Node(name=names["act"], op=phi, inputs=[nodes[-1].name], attrs=dict(phi_attrs)))
    nodes.append(_layer_node(second, layer_def, nodes[-1].name, kernel_size))
    # W2 = 0 and a zero bias: the branch adds exactly 0, whatever φ and W1 compute.
    tensors[f"{second}.weight"] = torch.zeros(weight_shape(width, hidden, kernel_size), dtype=dtype)
    tensors[f"{second}.bias"] = torch.zeros(width, dtype=dtype)
    nodes.append(Node(name=names["last"], op=insertable(_SUM_WORD).name, inputs=[after, second]))
    return nodes, tensors, first


def _insert(arch: Architecture, after: str, nodes: list) -> tuple:
    """A copy of `arch` with `nodes` right after `after`, its readers and outputs moved to the last.

    Returns (new architecture, names of rewired consumers, [{from, to}] of moved outputs).
    """
    new = arch.copy()
    last = nodes[-1].name
    new_names = {n.name for n in nodes}
    rewired = []
    for node in new.nodes:
        if after in node.inputs and node.name not in new_names:
            node.inputs = [last if i == after else i for i in node.inputs]
            rewired.append(node.name)
    outputs = [{"from": o, "to": last} for o in new.outputs if o == after]
    new.outputs = [last if o == after else o for o in new.outputs]
    at = new.node_names().index(after) + 1 if new.has_node(after) else 0
    new.nodes[at:at] = [Node(n.name, n.op, list(n.inputs), dict(n.attrs), dict(n.params)) for n in nodes]
    return new, rewired, outputs


def _check_memory(after: str, layer_def, width: int, hidden: Optional[int], kernel_size: int, dtype) -> None:
    """Refuse a new layer whose weights would not fit in memory, before building any of them
    (a huge --hidden or --kernel-size, or an identity matrix over a very wide value)."""
    from .guards import check_allocation

    layer_op = layer_def.name
    taps = math.prod(layer_def.insert.weight_shape(1, 1, kernel_size))  # kernel taps per weight
    elements = width * (hidden or width) * taps  # one weight; a residual branch has two
    total = elements * (2 if hidden else 1) * dtype.itemsize + elements * 4  # + the float32 build
    what = f"deepening after {after!r} with a {layer_op} layer of {elements} weights"
    instead = "use a smaller --hidden or --kernel-size" if hidden or taps > 1 else "deepen after a narrower value"
    check_allocation(total, what, instead, elements=elements)
