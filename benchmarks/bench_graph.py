#!/usr/bin/env python
"""Graph-size benchmark: inspect, widen and a long deepen recipe on graphs of many nodes (not a test).

Tensors are tiny (4 features); what grows is the node count, so the figures measure the graph
walks (shape inference, the coupled-group walk, value ranges, inserting nodes), not arithmetic.

Graphs, built in memory (:func:`ladder`): an MLP ladder of ``linear -> relu`` pairs with a
residual ``add`` every few pairs, so widening reaches an add and pulls in a second producer;
and a transformer-like stack (:func:`blocks`: 80 blocks of about 20 nodes). For each size the
benchmark times

* ``inspect``: :func:`n2nsurgery.inspect.describe` (every linear's widen group, every node's
  deepen-after);
* ``widen``: :func:`n2nsurgery.widen.widen` of a layer in the middle (planning and building the
  student, not writing it);
* ``deepen-recipe``: :func:`n2nsurgery.recipe.apply_recipe` of a recipe of ``--steps`` deepen
  steps with ``verify: false`` (on the 1k-node graph only at full size; the step count is what
  makes it long).

and writes ``benchmarks/results/graph.json``. Run it from the repository root::

    .venv/bin/python benchmarks/bench_graph.py            # 1k, 10k, 100k nodes
    .venv/bin/python benchmarks/bench_graph.py --quick    # 1k, 5k nodes, 200 deepen steps
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from n2nsurgery.arch import Architecture, InputSpec, Node  # noqa: E402
from n2nsurgery.model import Model, TensorStore  # noqa: E402

WIDTH = 4


def _model(nodes: list, tensors: dict, name: str) -> Model:
    arch = Architecture(inputs={"x": InputSpec("x", (WIDTH,))}, nodes=nodes, outputs=[nodes[-1].name], name=name)
    return Model(arch, TensorStore.from_tensors(tensors), source=name).check()


def _linear(nodes, tensors, name, src, gen):
    nodes.append(Node(name=name, op="linear", inputs=[src]))
    tensors[f"{name}.weight"] = torch.randn(WIDTH, WIDTH, generator=gen)
    tensors[f"{name}.bias"] = torch.randn(WIDTH, generator=gen)
    return name


def ladder(n_nodes: int, seed: int = 0) -> Model:
    """About `n_nodes` nodes: linear -> relu pairs, an add of the last two relus every 4 pairs."""
    gen = torch.Generator().manual_seed(seed)
    nodes, tensors = [], {}
    prev, skip, i = "x", None, 0
    while len(nodes) < n_nodes - 1:
        lin = _linear(nodes, tensors, f"fc{i}", prev, gen)
        nodes.append(Node(name=f"relu{i}", op="relu", inputs=[lin]))
        prev = f"relu{i}"
        if i % 4 == 3 and skip is not None:
            nodes.append(Node(name=f"add{i}", op="add", inputs=[skip, prev]))
            prev = f"add{i}"
        skip = prev if i % 4 == 0 else skip
        i += 1
    _linear(nodes, tensors, "head", prev, gen)
    return _model(nodes, tensors, f"ladder-{n_nodes}")


def blocks(n_blocks: int = 80, seed: int = 0) -> Model:
    """A transformer-like stack: per block, an MLP with a gate (silu -> mul), residual adds, and
    a second pre-activation sub-block; about 20 nodes a block."""
    gen = torch.Generator().manual_seed(seed)
    nodes, tensors = [], {}
    stream = _linear(nodes, tensors, "embed", "x", gen)
    for b in range(n_blocks):
        p = f"layers.{b}"
        for sub in ("attn", "mlp"):
            q = f"{p}.{sub}"
            nodes.append(Node(name=f"{q}.act_in", op="identity", inputs=[stream]))
            up = _linear(nodes, tensors, f"{q}.up_proj", f"{q}.act_in", gen)
            gate = _linear(nodes, tensors, f"{q}.gate_proj", f"{q}.act_in", gen)
            nodes.append(Node(name=f"{q}.act", op="silu", inputs=[gate]))
            nodes.append(Node(name=f"{q}.mul", op="mul", inputs=[f"{q}.act", up]))
            nodes.append(Node(name=f"{q}.drop", op="dropout", inputs=[f"{q}.mul"]))
            down = _linear(nodes, tensors, f"{q}.down_proj", f"{q}.drop", gen)
            nodes.append(Node(name=f"{q}.tanh", op="tanh", inputs=[down]))
            nodes.append(Node(name=f"{q}.res", op="add", inputs=[stream, f"{q}.tanh"]))
            stream = f"{q}.res"
    nodes.append(Node(name="final", op="relu", inputs=[stream]))
    _linear(nodes, tensors, "lm_head", "final", gen)
    return _model(nodes, tensors, f"blocks-{n_blocks}")


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_inspect(model) -> float:
    from n2nsurgery.inspect import describe

    return _time(lambda: describe(model))


def bench_widen(model) -> float:
    from n2nsurgery.widen import widen

    layers = [n.name for n in model.arch.nodes if n.op == "linear"]  # benchmark: names the op it builds
    layer = layers[len(layers) // 2]
    return _time(lambda: widen(model, layer, WIDTH * 2))


def bench_deepen_recipe(model, steps: int) -> float:
    from n2nsurgery.recipe import apply_recipe, parse_recipe

    relus = [n.name for n in model.arch.nodes if n.op == "relu"]
    lines = ["seed: 0", "verify: false", "steps:"]
    for k in range(steps):
        lines.append(f"  - deepen: {{after: {relus[k % len(relus)]}}}")
    recipe = parse_recipe("\n".join(lines) + "\n")
    return _time(lambda: apply_recipe(model, recipe, verify=False))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, as a smoke test")
    ap.add_argument("--steps", type=int, default=None, help="deepen steps of the recipe (default 2000; quick: 200)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "graph.json"))
    args = ap.parse_args(argv)
    sizes = (1_000, 5_000) if args.quick else (1_000, 10_000, 100_000)
    steps = args.steps or (200 if args.quick else 2_000)
    results = {"sizes": {}, "deepen_recipe": {}, "blocks": {}}
    for n in sizes:
        t = time.perf_counter()
        model = ladder(n)
        build = time.perf_counter() - t
        row = {"nodes": len(model.arch.nodes), "build_s": round(build, 3)}
        row["inspect_s"] = round(bench_inspect(model), 3)
        row["widen_s"] = round(bench_widen(model), 3)
        results["sizes"][str(n)] = row
        print(f"{n:>7} nodes: {row}", flush=True)
    model = ladder(1_000)
    results["deepen_recipe"] = {"nodes": len(model.arch.nodes), "steps": steps, "seconds": round(bench_deepen_recipe(model, steps), 3)}
    print(f"deepen recipe: {results['deepen_recipe']}", flush=True)
    model = blocks(80)
    results["blocks"] = {
        "blocks": 80,
        "nodes": len(model.arch.nodes),
        "inspect_s": round(bench_inspect(model), 3),
        "widen_s": round(bench_widen(model), 3),
    }
    print(f"80 blocks: {results['blocks']}", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
