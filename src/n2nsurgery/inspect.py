"""What `n2n inspect` shows: every node with its op, inputs, output shape and parameters."""

from __future__ import annotations

import math

from .ops import get_op


def describe(model) -> dict:
    """A JSON-ready description of `model` (the same data `n2n inspect` prints as a table)."""
    nodes = []
    keys = set()
    for node in model.arch.nodes:
        params = {}
        for role in get_op(node.op).params:
            key = node.param_key(role)
            if key in model.tensors:
                params[role] = {"key": key, "shape": list(model.tensors.shape(key)), "dtype": str(model.tensors.dtype(key)).removeprefix("torch.")}
        count = sum(math.prod(p["shape"]) for p in params.values() if p["key"] not in keys)
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
    }
