"""What `n2n inspect` shows: every node with its op, inputs, output shape and parameters."""

from __future__ import annotations

import math

from .ops import get_op


def _deepen_after(model, node, ranges) -> str:
    """What `n2n deepen --after NODE` can insert by default: an identity layer (exact with the
    default activation on this node's values) or only a zero-initialised residual branch."""
    from .deepen import features_last, is_identity_on

    rank = len(model.shapes[node.name])
    if rank == 0:
        return "no"  # a scalar per sample: no layer fits it
    if rank > 4 and not features_last(model, node.name):  # (there, auto picks linear: deepen agrees)
        return "--op linear"  # no conv of that rank; a linear layer over the last axis still fits
    phi = node.op if get_op(node.op).activation is not None else None
    if not is_identity_on(phi, node.resolved_attrs(), ranges[node.name]):
        return "residual"
    return f"identity+{phi}" if phi else "identity"


def describe(model) -> dict:
    """A JSON-ready description of `model` (the same data `n2n inspect` prints as a table).

    Besides shapes and parameters, each node says whether it can be widened (linear/conv: the
    coupled group of layers that widen together, or why not) and what can be inserted after it.
    """
    from .deepen import value_ranges

    ranges = value_ranges(model)
    groups: dict = {}  # layer -> the group it was found in: its partners need no walk of their own
    nodes = []
    keys = set()
    for node in model.arch.nodes:
        params = {}
        for role in get_op(node.op).params:
            key = node.param_key(role)
            if key in model.tensors:
                params[role] = {"key": key, "shape": list(model.tensors.shape(key)), "dtype": str(model.tensors.dtype(key)).removeprefix("torch.")}
        # Tied tensors count once; integer counters (num_batches_tracked) are not parameters.
        count = sum(
            math.prod(p["shape"]) for p in params.values() if p["key"] not in keys and not p["dtype"].startswith(("int", "uint", "bool"))
        )
        keys |= {p["key"] for p in params.values()}
        nodes.append(
            {
                "name": node.name,
                "op": node.op,
                "inputs": list(node.inputs),
                "attrs": dict(node.attrs),
                "output_shape": list(model.shapes[node.name]),
                "params": params,
                "param_count": count,
                "widen": _widen_info(model, node, groups) if get_op(node.op).units is not None else None,
                "deepen_after": _deepen_after(model, node, ranges),
            }
        )
    return {
        "source": model.source,
        "name": model.arch.name,
        "inputs": {k: v.to_dict() for k, v in model.arch.inputs.items()},
        "outputs": list(model.arch.outputs),
        "nodes": nodes,
        "totals": {
            "nodes": len(nodes),
            "parameters": sum(n["param_count"] for n in nodes),
            "tensors": len(keys),
        },
        "history": list(model.history),
        **_hf_summary(model),
    }


def _hf_summary(model) -> dict:
    """{"hf": config-level facts} for a model read from a Hugging Face folder, else {}."""
    from .hf_folder import summary

    facts = summary(model)
    return {"hf": facts} if facts is not None else {}


def _widen_info(model, node, groups: dict) -> dict:
    """The layers that widen with `node`, or why it cannot be widened. A layer found in an
    earlier layer's group widens with the same layers (they share one unit space), so the
    residual stream of a deep model is walked once, not once per layer on it."""
    from .widen import widen_info

    if node.name in groups:
        found, extra = groups[node.name]
        return {"group": [node.name] + sorted(found - {node.name}), **extra}
    info = widen_info(model, node.name)
    if "refused" in info:
        return info
    extra = {k: v for k, v in info.items() if k != "group"}
    for name in info["group"]:
        groups[name] = (frozenset(info["group"]), extra)
    return info
