"""What changed between two models: nodes, tensors and parameter counts (``n2n diff``).

For review: a pull request that grows a checkpoint should say which nodes were added and which
tensors changed shape. The diff reports; it does not judge (use ``n2n verify`` for that).

Nodes are matched by name, tensors by checkpoint key. A node is *changed* when its op, inputs,
attributes or parameter keys differ. Tensor values are compared only on request (``values=True``),
because that reads every tensor of both checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class NodeChange:
    name: str
    changes: dict  # field -> [old, new]; fields: op, inputs, attrs.<name>, params.<role>


@dataclass
class TensorChange:
    key: str
    old_shape: list
    new_shape: list
    old_dtype: str
    new_dtype: str


@dataclass
class ModelDiff:
    """The differences from model A to model B."""

    nodes_added: list = field(default_factory=list)  # of {"name", "op", "inputs"}
    nodes_removed: list = field(default_factory=list)  # of {"name", "op", "inputs"}
    nodes_changed: list = field(default_factory=list)  # of NodeChange
    tensors_added: list = field(default_factory=list)  # of {"key", "shape", "dtype"}
    tensors_removed: list = field(default_factory=list)  # of {"key", "shape", "dtype"}
    tensors_reshaped: list = field(default_factory=list)  # of TensorChange (shape or dtype differs)
    tensors_values_changed: list = field(default_factory=list)  # keys; filled only with values=True
    values_compared: bool = False
    inputs_changed: bool = False
    outputs: list = field(default_factory=list)  # [outputs of A, outputs of B] when they differ
    parameters: dict = field(default_factory=dict)  # {"a": n, "b": n}
    nodes: dict = field(default_factory=dict)  # {"a": n, "b": n}

    @property
    def empty(self) -> bool:
        return not (
            self.nodes_added or self.nodes_removed or self.nodes_changed or self.tensors_added
            or self.tensors_removed or self.tensors_reshaped or self.tensors_values_changed
            or self.inputs_changed or self.outputs
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _dtype(dt) -> str:
    return str(dt).removeprefix("torch.")


def _node_entry(node) -> dict:
    return {"name": node.name, "op": node.op, "inputs": list(node.inputs)}


def diff_models(a, b, *, values: bool = False) -> ModelDiff:
    """Compare model `a` (before) with model `b` (after).

    Args:
        a, b: :class:`~n2nsurgery.model.Model`.
        values: also list tensors whose shape is unchanged but whose values differ (reads every
            tensor of both models).

    Returns:
        A :class:`ModelDiff`; ``to_dict()`` gives the JSON ``n2n diff --json`` prints.

    Example:
        >>> from n2nsurgery.widen import widen
        >>> teacher = n2n.load_model("recipes/cnn.safetensors", "recipes/cnn.yaml")
        >>> student, _ = widen(teacher, "conv1", 64)
        >>> d = diff_models(teacher, student)
        >>> [(t.key, t.old_shape, t.new_shape) for t in d.tensors_reshaped if t.key == "conv1.weight"]
        [('conv1.weight', [8, 3, 3, 3], [64, 3, 3, 3])]
    """
    import torch

    out = ModelDiff()
    na = {n.name: n for n in a.arch.nodes}
    nb = {n.name: n for n in b.arch.nodes}
    out.nodes_added = [_node_entry(n) for n in b.arch.nodes if n.name not in na]
    out.nodes_removed = [_node_entry(n) for n in a.arch.nodes if n.name not in nb]
    for n in b.arch.nodes:
        old = na.get(n.name)
        if old is None:
            continue
        changes = {}
        if old.op != n.op:
            changes["op"] = [old.op, n.op]
        if list(old.inputs) != list(n.inputs):
            changes["inputs"] = [list(old.inputs), list(n.inputs)]
        for k in sorted(set(old.attrs) | set(n.attrs)):
            if old.attrs.get(k) != n.attrs.get(k):
                changes[f"attrs.{k}"] = [old.attrs.get(k), n.attrs.get(k)]
        for k in sorted(set(old.params) | set(n.params)):
            if old.params.get(k) != n.params.get(k):
                changes[f"params.{k}"] = [old.params.get(k), n.params.get(k)]
        if changes:
            out.nodes_changed.append(NodeChange(n.name, changes))

    ka, kb = a.tensors.keys(), b.tensors.keys()
    sa, sb = set(ka), set(kb)
    out.tensors_added = [{"key": k, "shape": list(b.tensors.shape(k)), "dtype": _dtype(b.tensors.dtype(k))} for k in kb if k not in sa]
    out.tensors_removed = [{"key": k, "shape": list(a.tensors.shape(k)), "dtype": _dtype(a.tensors.dtype(k))} for k in ka if k not in sb]
    for k in kb:
        if k not in sa:
            continue
        old_s, new_s = list(a.tensors.shape(k)), list(b.tensors.shape(k))
        old_d, new_d = _dtype(a.tensors.dtype(k)), _dtype(b.tensors.dtype(k))
        if old_s != new_s or old_d != new_d:
            out.tensors_reshaped.append(TensorChange(k, old_s, new_s, old_d, new_d))
        elif values and not torch.equal(a.tensors.get(k), b.tensors.get(k)):
            out.tensors_values_changed.append(k)
    out.values_compared = values

    ia = {k: v.to_dict() for k, v in a.arch.inputs.items()}
    ib = {k: v.to_dict() for k, v in b.arch.inputs.items()}
    out.inputs_changed = ia != ib
    if list(a.arch.outputs) != list(b.arch.outputs):
        out.outputs = [list(a.arch.outputs), list(b.arch.outputs)]
    out.parameters = {"a": a.parameter_count(), "b": b.parameter_count()}
    out.nodes = {"a": len(a.arch.nodes), "b": len(b.arch.nodes)}
    return out


def summarize(d) -> str:
    """One line for a diff (a :class:`ModelDiff` or its ``to_dict()``), e.g. for a summary table.

    Example:
        >>> from n2nsurgery.deepen import deepen
        >>> teacher = n2n.load_model("recipes/cnn.safetensors", "recipes/cnn.yaml")
        >>> student, _ = deepen(teacher, "relu2")
        >>> summarize(diff_models(teacher, student))
        '+2 nodes (relu2_deep, relu2_deep_relu); 1 node changed (flat); +2 tensors; params 1,842 → 2,426'
    """
    if isinstance(d, ModelDiff):
        d = d.to_dict()
    parts = []

    def names(items, key="name", limit=4):
        shown = [i[key] for i in items[:limit]]
        more = f", +{len(items) - limit} more" if len(items) > limit else ""
        return ", ".join(shown) + more

    def count(items, word):
        return f"{len(items)} {word}{'s' if len(items) > 1 else ''}"

    if d["nodes_added"]:
        parts.append(f"+{count(d['nodes_added'], 'node')} ({names(d['nodes_added'])})")
    if d["nodes_removed"]:
        parts.append(f"-{count(d['nodes_removed'], 'node')} ({names(d['nodes_removed'])})")
    if d["nodes_changed"]:
        parts.append(f"{count(d['nodes_changed'], 'node')} changed ({names(d['nodes_changed'])})")
    if d["tensors_reshaped"]:
        parts.append(f"{count(d['tensors_reshaped'], 'tensor')} reshaped")
    if d["tensors_added"]:
        parts.append(f"+{count(d['tensors_added'], 'tensor')}")
    if d["tensors_removed"]:
        parts.append(f"-{count(d['tensors_removed'], 'tensor')}")
    if d["tensors_values_changed"]:
        parts.append(f"{len(d['tensors_values_changed'])} tensors with new values")
    p = d["parameters"]
    parts.append(f"params {p['a']:,} → {p['b']:,}")
    return "; ".join(parts)


def fmt_shape(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def growth(a: int, b: int) -> str:
    """``+12.5%``-style relative change of a count (``×3.0`` from double on), or ``new`` from zero."""
    if a == 0:
        return "new" if b else "±0%"
    if b >= 2 * a:  # "+12908.9%" reads worse than "×130.1"
        return f"×{b / a:.1f}"
    return f"{(b - a) / a:+.1%}"


__all__ = ["ModelDiff", "NodeChange", "TensorChange", "diff_models", "summarize", "growth", "fmt_shape"]
