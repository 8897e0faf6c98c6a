"""Property tests: random valid architectures, random widen/deepen requests, exactness or refusal.

A hypothesis strategy builds random graphs over the whole first op set (chains and branches,
concats of 2-4 inputs, nested and with repeated inputs, residual adds with identity and
projection skips, squeeze-excitation style broadcast multiplies, batchnorm with random running
statistics, flatten of non-square maps, depthwise and grouped convs, 1-D/2-D/3-D convs,
pooling, random widths and dtypes, sometimes two inputs or two outputs). Each graph is emitted
as an architecture YAML text plus a state_dict.

The oracle is :func:`interpret`, a small interpreter written here: it reads the YAML with
``yaml.safe_load`` and runs each node with ``torch.nn.functional`` calls in float64. It does not
use ``n2nsurgery.executor``, the op registry or the architecture parser, so a bug there cannot
hide a bug in the surgery. Every accepted request must give a student whose outputs, run by
this interpreter, match the untouched TEACHER's (max |Δ| relative to max |y|, by dtype); every
refused one must raise :class:`~n2nsurgery.errors.N2NError` with a message and leave the teacher
untouched; nothing may raise anything else. Through the CLI, a refusal exits 2 with one
``error:`` line and writes nothing.

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (default; derandomized, a few hundred examples in all)
and ``long`` (5,000+ examples of the API property, for manual runs)::

    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -q tests/test_property_graphs.py
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import n2nsurgery as n2n  # noqa: E402
from n2nsurgery.deepen import deepen  # noqa: E402
from n2nsurgery.errors import N2NError  # noqa: E402
from n2nsurgery.widen import widen  # noqa: E402

# ------------------------------------------------------------------------------------ profiles

from acceptance import Tally  # noqa: E402
from hypothesis_profiles import LONG  # noqa: E402  (registers and loads "ci" / "long")

# Examples per test: (ci, long). The API property carries the bulk; the CLI one is slower per
# example (files, verification) and checks the command-line contract on top.
API_EXAMPLES = 5000 if LONG else 300
CLI_EXAMPLES = 500 if LONG else 60

# max |Δ| / max |y| allowed, by the least precise dtype among the checkpoint's tensors. The
# interpreter runs in float64, so the only error is the rounding of the remapped weights
# (w · share stored back in the checkpoint dtype).
# Minimum shares of accepted requests (tests/acceptance.py): a refusal passes the property, so
# without a floor a tool that refused everything would pass. Under the rates measured with the
# ci profile: api widen 54-62%, deepen 32-42% (they move by several points between processes,
# derandomized or not); cli widen 31/58, deepen 5/19.
FLOORS = {"api widen": 0.40, "api deepen": 0.20, "cli widen": 0.40, "cli deepen": 0.15}

REL_TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# --------------------------------------------------------------------------------- interpreter
#
# One entry per op: (inputs, params, attrs as written in the YAML) -> output. Defaults are
# spelled out here again on purpose (docs/ops.md), independent of the op registry.


def _conv(fn):
    def run(xs, p, a):
        return fn(xs[0], p["weight"], p.get("bias"), a.get("stride", 1), a.get("padding", 0), a.get("dilation", 1), a.get("groups", 1))

    return run


def _window(fn):
    def run(xs, p, a):
        k = a["kernel_size"]
        s = a.get("stride")
        return fn(xs[0], k, k if s is None else s, a.get("padding", 0))

    return run


def _adaptive(fn):
    return lambda xs, p, a: fn(xs[0], a["output_size"])


def _batchnorm(xs, p, a):
    return F.batch_norm(xs[0], p["running_mean"], p["running_var"], p.get("weight"), p.get("bias"), training=False, eps=a.get("eps", 1e-5))


def _sum(xs, p, a):
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def _prod(xs, p, a):
    out = xs[0]
    for x in xs[1:]:
        out = out * x
    return out


FUNCTIONAL = {
    "linear": lambda xs, p, a: F.linear(xs[0], p["weight"], p.get("bias")),
    "conv1d": _conv(F.conv1d),
    "conv2d": _conv(F.conv2d),
    "conv3d": _conv(F.conv3d),
    "batchnorm": _batchnorm,
    "relu": lambda xs, p, a: F.relu(xs[0]),
    "relu6": lambda xs, p, a: F.relu6(xs[0]),
    "sigmoid": lambda xs, p, a: torch.sigmoid(xs[0]),
    "tanh": lambda xs, p, a: torch.tanh(xs[0]),
    "silu": lambda xs, p, a: F.silu(xs[0]),
    "identity": lambda xs, p, a: xs[0],
    "leaky_relu": lambda xs, p, a: F.leaky_relu(xs[0], a.get("negative_slope", 0.01)),
    "gelu": lambda xs, p, a: F.gelu(xs[0], approximate=a.get("approximate", "none")),
    "dropout": lambda xs, p, a: F.dropout(xs[0], a.get("p", 0.5), training=False),
    "flatten": lambda xs, p, a: torch.flatten(xs[0], a.get("start_dim", 1), a.get("end_dim", -1)),
    "add": _sum,
    "mul": _prod,
    "concat": lambda xs, p, a: torch.cat(xs, dim=a.get("dim", 1)),
}
for _nd in (1, 2, 3):
    FUNCTIONAL[f"max_pool{_nd}d"] = _window(getattr(F, f"max_pool{_nd}d"))
    FUNCTIONAL[f"avg_pool{_nd}d"] = _window(getattr(F, f"avg_pool{_nd}d"))
    FUNCTIONAL[f"adaptive_max_pool{_nd}d"] = _adaptive(getattr(F, f"adaptive_max_pool{_nd}d"))
    FUNCTIONAL[f"adaptive_avg_pool{_nd}d"] = _adaptive(getattr(F, f"adaptive_avg_pool{_nd}d"))

ROLES = ("weight", "bias", "running_mean", "running_var")
_NODE_KEYS = ("name", "op", "in", "params")


def interpret(arch_yaml: str, state_dict: dict, inputs: dict) -> list:
    """The outputs of the architecture `arch_yaml` with `state_dict`, in float64, in eval mode."""
    doc = yaml.safe_load(arch_yaml)
    nodes = {n["name"]: n for n in doc["nodes"]}
    values = {k: v.to(torch.float64) for k, v in inputs.items()}

    def value(name):
        if name in values:
            return values[name]
        node = nodes[name]
        ins = node["in"] if isinstance(node["in"], list) else [node["in"]]
        xs = [value(i) for i in ins]
        keys = node.get("params") or {}
        params = {}
        for role in ROLES:
            key = keys.get(role, f"{name}.{role}")
            if key in state_dict:
                params[role] = state_dict[key].to(torch.float64)
        attrs = {k: v for k, v in node.items() if k not in _NODE_KEYS}
        values[name] = FUNCTIONAL[node["op"]](xs, params, attrs)
        return values[name]

    outs = doc["outputs"] if isinstance(doc["outputs"], list) else [doc["outputs"]]
    return [value(o) for o in outs]


def rel_error(want: list, got: list) -> float:
    """max over outputs of max |got − want| / max |want| (shapes must agree exactly)."""
    assert len(want) == len(got), f"{len(got)} outputs, the teacher has {len(want)}"
    worst = 0.0
    for w, g in zip(want, got):
        assert tuple(w.shape) == tuple(g.shape), f"output shape {tuple(g.shape)}, the teacher's is {tuple(w.shape)}"
        scale = max(float(w.abs().max()), 1e-6)
        worst = max(worst, float((g - w).abs().max()) / scale)
    return worst


# ----------------------------------------------------------------------------------- generator

ACTS = ("relu", "relu6", "sigmoid", "tanh", "silu", "identity", "leaky_relu", "gelu", "dropout")


@dataclass
class Graph:
    """A generated teacher: YAML text, state_dict, and the facts requests are drawn from."""

    yaml: str
    state_dict: dict
    inputs: dict  # name -> one-sample shape
    dtype: torch.dtype
    producers: list  # linear/conv nodes
    others: list  # every other node
    description: list = field(default_factory=list)

    def probes(self, n: int = 6, seed: int = 1234) -> dict:
        g = torch.Generator().manual_seed(seed)
        return {k: torch.randn((n,) + tuple(s), generator=g, dtype=torch.float64) for k, s in self.inputs.items()}


class _Builder:
    """Grows a graph node by node, computing every value on a small batch as it goes (so shapes
    come from running the interpreter's functions, not from the tool's shape rules)."""

    def __init__(self, draw, dtype: torch.dtype, seed: int):
        self.draw = draw
        self.dtype = dtype
        self.gen = torch.Generator().manual_seed(seed)
        self.inputs: dict = {}
        self.nodes: list = []
        self.sd: dict = {}
        self.vals: dict = {}
        self.count = 0
        self.desc: list = []
        self.dotted = draw(st.booleans())  # state_dict-like names with dots: blk3.conv

    # -- helpers

    def name(self, stem: str) -> str:
        self.count += 1
        return f"b{self.count}.{stem}" if self.dotted else f"{stem}{self.count}"

    def shape(self, v: str) -> tuple:
        return tuple(self.vals[v].shape[1:])

    def randn(self, *shape, scale=1.0):
        return (torch.randn(shape, generator=self.gen, dtype=torch.float64) * scale).to(self.dtype)

    def input(self, shape) -> str:
        name = "x" if not self.inputs else f"x{len(self.inputs) + 1}"
        self.inputs[name] = tuple(shape)
        self.vals[name] = torch.randn((2,) + tuple(shape), generator=self.gen, dtype=torch.float64)
        return name

    def node(self, op: str, ins, tensors=None, **attrs) -> str:
        ins = [ins] if isinstance(ins, str) else list(ins)
        name = self.name(op.split("_")[0])
        entry = {"name": name, "op": op, "in": ins[0] if len(ins) == 1 else ins}
        entry.update(attrs)
        params = {}
        for role, t in (tensors or {}).items():
            if t is None:
                continue
            self.sd[f"{name}.{role}"] = t.contiguous()
            if role in ROLES:
                params[role] = t.to(torch.float64)
        self.vals[name] = FUNCTIONAL[op]([self.vals[i] for i in ins], params, attrs)
        self.nodes.append(entry)
        return name

    def tied(self, like: str, v: str) -> str:
        """Node `like` (a linear/conv) applied again to `v`, its tensors shared (tied) through
        ``params:`` rather than copied."""
        src = next(n for n in self.nodes if n["name"] == like)
        name = self.name("tied")
        keys = {role: f"{like}.{role}" for role in ("weight", "bias") if f"{like}.{role}" in self.sd}
        attrs = {k: v for k, v in src.items() if k not in _NODE_KEYS}
        entry = {"name": name, "op": src["op"], "in": v, **attrs, "params": keys}
        params = {role: self.sd[key].to(torch.float64) for role, key in keys.items()}
        self.vals[name] = FUNCTIONAL[src["op"]]([self.vals[v]], params, attrs)
        self.nodes.append(entry)
        return name

    # -- layers

    def width(self, lo=1, hi=7) -> int:
        return self.draw(st.integers(lo, hi))

    def linear(self, v: str, out: int | None = None) -> str:
        fin = self.shape(v)[-1]
        out = out if out is not None else self.width()
        bias = self.draw(st.integers(0, 3)) > 0
        t = {"weight": self.randn(out, fin, scale=1 / math.sqrt(fin)), "bias": self.randn(out, scale=0.1) if bias else None}
        return self.node("linear", v, t)

    def conv(self, v: str, out: int | None = None, k: int | None = None, same: bool = False, groups: int = 1) -> str:
        c, *spatial = self.shape(v)
        nd = len(spatial)
        out = out if out is not None else self.width()
        if k is None:
            k = self.draw(st.sampled_from([1, 3])) if min(spatial) >= 3 else 1
        attrs = {}
        if k > 1:
            if same or self.draw(st.booleans()):
                attrs["padding"] = k // 2
        if not same and k == 1 and min(spatial) >= 4 and self.draw(st.integers(0, 5)) == 0:
            attrs["stride"] = 2
        if not same and k == 3 and min(spatial) >= 6 and self.draw(st.integers(0, 7)) == 0:
            attrs["dilation"] = 2
            attrs["padding"] = 2
        if groups != 1:
            attrs["groups"] = groups
        fan_in = (c // groups) * k**nd
        bias = self.draw(st.booleans())
        t = {
            "weight": self.randn(out, c // groups, *([k] * nd), scale=1 / math.sqrt(fan_in)),
            "bias": self.randn(out, scale=0.1) if bias else None,
        }
        return self.node(f"conv{nd}d", v, t, **attrs)

    def batchnorm(self, v: str) -> str:
        c = self.shape(v)[0]
        affine = self.draw(st.booleans())
        t = {
            "running_mean": self.randn(c, scale=0.5),
            "running_var": (torch.rand(c, generator=self.gen, dtype=torch.float64) * 1.5 + 0.25).to(self.dtype),
            "weight": (1 + torch.randn(c, generator=self.gen, dtype=torch.float64) * 0.2).to(self.dtype) if affine else None,
            "bias": self.randn(c, scale=0.2) if affine else None,
        }
        if self.draw(st.booleans()):
            t["num_batches_tracked"] = torch.tensor(self.draw(st.integers(0, 1000)), dtype=torch.int64)
        attrs = {"eps": self.draw(st.sampled_from([1e-5, 1e-3]))} if self.draw(st.booleans()) else {}
        return self.node("batchnorm", v, t, **attrs)

    def act(self, v: str, which: str | None = None) -> str:
        which = which or self.draw(st.sampled_from(ACTS))
        attrs = {}
        if which == "leaky_relu" and self.draw(st.booleans()):
            attrs["negative_slope"] = self.draw(st.sampled_from([0.1, 0.2, 1.0]))
        if which == "gelu" and self.draw(st.booleans()):
            attrs["approximate"] = "tanh"
        if which == "dropout" and self.draw(st.booleans()):
            attrs["p"] = 0.1
        return self.node(which, v, **attrs)

    def maybe_bn_act(self, v: str) -> str:
        if self.draw(st.booleans()):
            v = self.batchnorm(v)
        if self.draw(st.booleans()):
            v = self.act(v)
        return v

    # -- spatial blocks: [C, *spatial] -> [C', *spatial']

    def spatial_block(self, v: str) -> str:
        kind = self.draw(
            st.sampled_from(["conv", "conv", "depthwise", "grouped", "pool", "act", "bn", "concat", "residual", "projection", "gate", "se", "tied"])
        )
        self.desc.append(kind)
        c, *spatial = self.shape(v)
        nd = len(spatial)
        if kind == "conv":
            return self.maybe_bn_act(self.conv(v))
        if kind == "depthwise":
            mult = self.draw(st.sampled_from([1, 1, 2]))
            k = 3 if min(spatial) >= 3 else 1
            return self.maybe_bn_act(self.conv(v, out=c * mult, k=k, same=True, groups=c))
        if kind == "grouped":
            if c % 2 or c < 4:
                return self.conv(v)
            return self.conv(v, out=2 * self.width(1, 3), k=1, groups=2)
        if kind == "pool":
            if min(spatial) >= 2 and self.draw(st.booleans()):
                which = self.draw(st.sampled_from(["max", "avg"]))
                attrs = {"kernel_size": 2}
                if min(spatial) >= 3 and self.draw(st.booleans()):
                    attrs.update(stride=1, padding=1)
                return self.node(f"{which}_pool{nd}d", v, **attrs)
            which = self.draw(st.sampled_from(["adaptive_max", "adaptive_avg"]))
            size = [self.draw(st.integers(1, n)) for n in spatial]
            return self.node(f"{which}_pool{nd}d", v, output_size=size if len(set(size)) > 1 or self.draw(st.booleans()) else size[0])
        if kind == "act":
            return self.act(v)
        if kind == "bn":
            return self.batchnorm(v)
        if kind == "concat":
            return self.concat(v, nd)
        if kind == "tied":  # one conv applied to two values: joined by a concat (uncoupled) or an add
            a = self.conv(v, k=1, same=True)
            b = self.tied(a, self.act(v, "relu"))
            return self.node(self.draw(st.sampled_from(["concat", "add"])), [self.act(a, "tanh"), b])
        if kind == "residual":  # identity skip: v + bn(conv(act(bn(conv(v)))))
            b = self.maybe_bn_act(self.conv(v, k=3 if min(spatial) >= 3 else 1, same=True))
            b = self.conv(b, out=c, k=3 if min(spatial) >= 3 else 1, same=True)
            if self.draw(st.booleans()):
                b = self.batchnorm(b)
            ins = [v, b] if self.draw(st.booleans()) else [b, v]
            return self.node("add", ins)
        if kind == "projection":  # 1x1 projection skip + branch, same output channels
            out = self.width()
            p = self.conv(v, out=out, k=1, same=True)
            b = self.maybe_bn_act(self.conv(v, k=3 if min(spatial) >= 3 else 1, same=True))
            b = self.conv(b, out=out, k=1, same=True)
            return self.act(self.node("add", [p, b]), "relu")
        if kind == "gate":  # mul of two convs (2 or 3 operands)
            out = self.width()
            a = self.conv(v, out=out, k=1, same=True)
            g = self.act(self.conv(v, out=out, k=1, same=True), "sigmoid")
            ins = [a, g] + ([self.conv(v, out=out, k=1, same=True)] if self.draw(st.booleans()) else [])
            return self.node(self.draw(st.sampled_from(["mul", "add"])), ins)
        # se: squeeze-excitation, a per-channel [C, 1, ...] gate broadcast over the map
        s = self.node(f"adaptive_avg_pool{nd}d", v, output_size=1)
        s = self.act(self.conv(s, out=self.width(1, 3), k=1), "relu")
        s = self.act(self.conv(s, out=c, k=1), "sigmoid")
        return self.node("mul", [v, s] if self.draw(st.booleans()) else [s, v])

    def concat(self, v: str, nd: int, depth: int = 0) -> str:
        """2-4 parts along the channels: new convs, `v` itself (possibly twice), nested concats."""
        n = self.draw(st.integers(2, 4))
        parts = []
        for _ in range(n):
            kind = self.draw(st.sampled_from(["conv", "conv", "self", "nested"] if depth == 0 else ["conv", "self"]))
            if kind == "conv":
                k = 3 if min(self.shape(v)[1:]) >= 3 else 1
                parts.append(self.maybe_bn_act(self.conv(v, k=k, same=True)))
            elif kind == "self":
                parts.append(v)
            else:
                parts.append(self.concat(v, nd, depth + 1))
        dim = self.draw(st.sampled_from([1, -(nd + 1)]))
        return self.node("concat", parts, **({"dim": dim} if dim != 1 or self.draw(st.booleans()) else {}))

    # -- feature blocks: [F] -> [F']

    def feature_block(self, v: str) -> str:
        kind = self.draw(st.sampled_from(["linear", "linear", "act", "bn", "concat", "residual", "projection", "gate", "dropout", "tied"]))
        self.desc.append(f"fc-{kind}")
        f = self.shape(v)[-1]
        if kind == "linear":
            return self.maybe_bn_act(self.linear(v))
        if kind == "act":
            return self.act(v)
        if kind == "bn":
            return self.batchnorm(v) if len(self.shape(v)) == 1 else self.act(v)
        if kind == "dropout":
            return self.act(v, "dropout")
        if kind == "tied":  # one linear applied to two values, each with its own consumer
            a = self.linear(v)
            b = self.tied(a, self.act(v, "tanh"))
            return self.node("concat", [self.linear(self.act(a, "relu")), self.linear(b)], dim=-1)
        if kind == "concat":
            parts = []
            for _ in range(self.draw(st.integers(2, 4))):
                parts.append(v if self.draw(st.integers(0, 3)) == 0 else self.maybe_bn_act(self.linear(v)))
            dim = self.draw(st.sampled_from([1, -1])) if len(self.shape(v)) == 1 else -1
            return self.node("concat", parts, dim=dim)
        if kind == "residual":
            b = self.act(self.linear(v), "relu")
            b = self.linear(b, out=f)
            return self.node("add", [v, b])
        if kind == "projection":
            out = self.width()
            return self.node("add", [self.linear(v, out=out), self.linear(self.act(self.linear(v), "tanh"), out=out)])
        out = self.width()
        return self.node("mul", [self.linear(v, out=out), self.act(self.linear(v, out=out), "sigmoid")])


@st.composite
def graphs(draw) -> Graph:
    """A random valid teacher over the first op set (see the module docstring)."""
    dtype = draw(st.sampled_from([torch.float32] * 5 + [torch.float64, torch.float16, torch.bfloat16]))
    b = _Builder(draw, dtype, draw(st.integers(0, 2**31 - 1)))
    nd = draw(st.sampled_from([0, 1, 2, 2, 3]))  # 0: a feature (MLP) model
    outputs = []
    if nd == 0:
        seq = draw(st.integers(0, 4))  # >0: a [T, F] input, linear acting on the last axis
        shape = (seq, b.width(1, 6)) if seq else (b.width(1, 6),)
        v = b.input(shape)
        if draw(st.integers(0, 5)) == 0:  # a second input, joined by an add
            w = b.input(shape)
            v = b.node("add", [b.linear(v, out=4), b.linear(w, out=4)])
        for _ in range(draw(st.integers(1, 4))):
            v = b.feature_block(v)
        if seq:
            v = b.node("flatten", v)
    else:
        sizes = {1: (3, 12), 2: (2, 7), 3: (2, 4)}[nd]
        spatial = [draw(st.integers(*sizes)) for _ in range(nd)]
        v = b.input([b.width(1, 4)] + spatial)
        if draw(st.integers(0, 5)) == 0:
            w = b.input([b.width(1, 4)] + spatial)
            out = b.width()
            v = b.node("add", [b.conv(v, out=out, k=1, same=True), b.conv(w, out=out, k=1, same=True)])
        for _ in range(draw(st.integers(1, 4))):
            v = b.spatial_block(v)
        head = draw(st.sampled_from(["flatten", "flatten", "pool", "rows"]))
        if head == "pool":
            v = b.node(f"adaptive_avg_pool{nd}d", v, output_size=1)
        if head == "rows":
            # flatten the spatial axes only, a linear along them ([C, S] -> [C, F]), then the rest
            v = b.linear(b.node("flatten", v, start_dim=2))
        v = b.node("flatten", v, **({"end_dim": -1} if draw(st.booleans()) else {}))
        for _ in range(draw(st.integers(0, 2))):
            v = b.feature_block(v)
    if len(b.nodes) > 1 and draw(st.integers(0, 5)) == 0:  # an auxiliary output from inside
        aux = draw(st.sampled_from([n["name"] for n in b.nodes]))
        if aux != v:
            outputs.append(aux)
    outputs.insert(0, b.linear(v, out=b.width(1, 5)))
    nodes = list(b.nodes)
    in_dtype = "float64" if dtype == torch.float64 else "float32"
    doc = ["format: n2n-arch/1", "name: random", "inputs:"]
    for k, s in b.inputs.items():
        doc.append(f"  {k}: {{shape: {list(s)}, dtype: {in_dtype}}}")
    doc.append("nodes:")
    for n in nodes:
        doc.append("  - " + yaml.safe_dump(n, default_flow_style=True, sort_keys=False, width=1 << 20).strip())
    doc.append(f"outputs: {yaml.safe_dump(outputs, default_flow_style=True).strip()}")
    producers = [n["name"] for n in b.nodes if n["op"] in ("linear", "conv1d", "conv2d", "conv3d")]
    others = [n["name"] for n in b.nodes if n["name"] not in producers]
    return Graph("\n".join(doc) + "\n", b.sd, dict(b.inputs), dtype, producers, others, b.desc)


# ------------------------------------------------------------------------------------ requests


@st.composite
def widen_requests(draw, model) -> dict:
    names = [n.name for n in model.arch.nodes]
    producers = [n.name for n in model.arch.nodes if n.op in ("linear", "conv1d", "conv2d", "conv3d")]
    # Mostly valid requests (a producer, a larger width); sometimes anything at all.
    if draw(st.sampled_from([True] * 9 + [False])):
        layer = draw(st.sampled_from(producers))
    else:
        layer = draw(st.sampled_from(names + list(model.arch.inputs) + ["no_such_layer"]))
    if layer in producers:
        node = model.arch.node(layer)
        axis = len(model.shapes[layer]) - 1 if node.op == "linear" else 0
        cur = model.shapes[layer][axis]
        larger = draw(st.sampled_from([True] * 9 + [False]))
        width = cur + draw(st.sampled_from([1, 1, 2, 3, 5, 8])) if larger else draw(st.integers(0, cur))
    else:
        width = draw(st.integers(1, 9))
    return {
        "kind": "widen",
        "layer": layer,
        "width": width,
        "split": draw(st.sampled_from(["equal", "random"])),
        "noise": draw(st.sampled_from([0.0, 0.0, 0.0, 0.01])),
        "seed": draw(st.integers(0, 1000)),
    }


@st.composite
def deepen_requests(draw, model) -> dict:
    after = draw(st.sampled_from([n.name for n in model.arch.nodes] + list(model.arch.inputs)))
    op = draw(st.sampled_from(["auto", "auto", "linear", "conv", "residual"]))
    req = {"kind": "deepen", "after": after, "op": op, "seed": draw(st.integers(0, 1000))}
    if draw(st.booleans()):
        req["activation"] = draw(st.sampled_from(["none", "relu", "relu6", "leaky_relu", "sigmoid", "tanh", "silu", "gelu"]))
    if draw(st.booleans()):
        req["batchnorm"] = True
    if draw(st.integers(0, 3)) == 0:
        req["kernel_size"] = draw(st.sampled_from([1, 2, 5]))
    if op == "residual" and draw(st.booleans()) or draw(st.integers(0, 15)) == 0:
        req["hidden"] = draw(st.integers(1, 6))
    if draw(st.integers(0, 7)) == 0:
        req["name"] = draw(st.sampled_from([after, "fresh_name", "x"]))
    return req


def apply_request(model, req: dict):
    """Run one request through the Python API; returns (student, exact student)."""
    if req["kind"] == "widen":
        student, report = widen(model, req["layer"], req["width"], split=req["split"], noise=req["noise"], seed=req["seed"])
        assert report.to_dict()["new_width"] == req["width"]
        return student, (report.noise_free if req["noise"] > 0 else student)
    kwargs = {k: v for k, v in req.items() if k not in ("kind", "after")}
    student, report = deepen(model, req["after"], **kwargs)
    assert report.to_dict()["after"] == req["after"]
    return student, student


def least_precise(state_dict: dict) -> torch.dtype:
    order = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    present = {t.dtype for t in state_dict.values() if t.is_floating_point()}
    return next((d for d in order if d in present), torch.float32)


def _snapshot(model) -> tuple:
    return model.arch.to_yaml(), {k: model.tensors.get(k).clone() for k in model.tensors.keys()}


def _unchanged(model, snap) -> bool:
    yaml_text, tensors = snap
    return model.arch.to_yaml() == yaml_text and all(torch.equal(model.tensors.get(k), t) for k, t in tensors.items())


# ------------------------------------------------------------------------------------ properties


def _tallies(prefix: str) -> dict:
    return {kind: Tally(f"{prefix} {kind}", FLOORS[f"{prefix} {kind}"]) for kind in ("widen", "deepen")}


@pytest.mark.slow
def test_api_requests_preserve_the_function_or_refuse():
    """Random widen/deepen sequences through the Python API: exact against the teacher, or
    N2NError; and enough of each kind accepted."""
    tallies = _tallies("api")
    _api_examples(tallies=tallies)
    for tally in tallies.values():
        tally.check()


@settings(max_examples=API_EXAMPLES)
@given(graph=graphs(), data=st.data())
def _api_examples(graph, data, tallies):
    teacher = n2n.model_from_state_dict(graph.yaml, graph.state_dict)
    probes = graph.probes()
    want = interpret(graph.yaml, graph.state_dict, probes)
    tol = REL_TOL[graph.dtype]
    model = teacher
    for step in range(data.draw(st.integers(1, 4), label="steps")):
        kind = data.draw(st.sampled_from(["widen", "deepen"]), label=f"kind{step}")
        req = data.draw((widen_requests if kind == "widen" else deepen_requests)(model), label=f"request{step}")
        snap = _snapshot(model)
        try:
            student, exact = apply_request(model, req)
        except N2NError as e:
            tallies[kind].refuse()
            event(f"{req['kind']} refused: {_reason(e)}")
            assert str(e).strip(), f"refusal without a message for {req}"
            assert "\n" not in str(e), f"a refusal is one line: {e}"
            # The teacher is valid, so a shape error of a generated node means the surgery built
            # an inconsistent student and then refused it: a bug, not a refusal.
            assert not str(e).startswith("<architecture>: node"), f"{req} built an invalid student: {e}"
            assert _unchanged(model, snap), f"a refused request changed its input model: {req}"
            continue
        assert _unchanged(model, snap), f"the surgery changed its input model: {req}"
        tallies[kind].accept()
        event(f"{req['kind']} accepted")
        sd = exact.tensors.to_dict()
        got = interpret(exact.arch.to_yaml(), sd, probes)
        err = rel_error(want, got)
        assert err <= REL_TOL[least_precise(sd)] or err <= tol, (
            f"step {step} {req} is not function-preserving: max|Δ|/max|y| = {err:.3g}\n{exact.arch.to_yaml()}"
        )
        if req.get("noise"):
            _check_noise_only_on_replicas(model, student, exact, req)
        model = student if not req.get("noise") else exact


def _reason(e: Exception) -> str:
    """A coarse class of a refusal, for hypothesis' statistics (--hypothesis-show-statistics)."""
    text = str(e)
    for key in ("model output", "model input", "not larger", "no node", "two different unit maps", "grouped", "declares no",
                "not exact", "would change the function", "has no units", "no centre", "--hidden", "--name", "--kernel-size",
                "--op conv", "multiplier", "spatial axis", "concatenated axis", "merged output", "broadcast"):
        if key in text:
            return key
    return text[:60]


def _check_noise_only_on_replicas(teacher, noisy, exact, req) -> None:
    """Noise moves only the new replicas: every tensor agrees with the exact student on the
    original units (the first old-width rows of the widened layer)."""
    layer = req["layer"]
    for key in exact.tensors.keys():
        a, b = exact.tensors.get(key), noisy.tensors.get(key)
        assert a.shape == b.shape, key
        if key in teacher.tensors and tuple(teacher.tensors.shape(key)) == tuple(a.shape):
            assert torch.equal(a, b), f"noise changed untouched tensor {key!r}"
    w_old = teacher.tensors.get(f"{layer}.weight") if f"{layer}.weight" in teacher.tensors else None
    if w_old is not None:
        n = w_old.shape[0]
        assert torch.equal(noisy.tensors.get(f"{layer}.weight")[:n], w_old), "noise reached the original units"


# ----------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_requests_preserve_the_function_or_exit_2(tmp_path_factory):
    """The same through `n2n widen` / `n2n deepen`: exit 0 and an exact checkpoint, or exit 2,
    one `error:` line, no output file and no temporary file left behind; and enough of each
    kind accepted."""
    tallies = _tallies("cli")
    _cli_examples(tmp_path_factory=tmp_path_factory, tallies=tallies)
    for tally in tallies.values():
        tally.check()


@settings(max_examples=CLI_EXAMPLES)
@given(graph=graphs(), data=st.data())
def _cli_examples(graph, data, tmp_path_factory, tallies):
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from n2nsurgery.cli import app

    folder = tmp_path_factory.mktemp("cli")
    ckpt, arch = folder / "teacher.safetensors", folder / "teacher.yaml"
    save_file(graph.state_dict, str(ckpt), metadata={"format": "pt"})
    arch.write_text(graph.yaml)
    teacher = n2n.load_model(str(ckpt), str(arch))
    probes = graph.probes()
    want = interpret(graph.yaml, graph.state_dict, probes)
    runner = CliRunner()
    src, src_arch = ckpt, arch
    for step in range(data.draw(st.integers(1, 2), label="steps")):
        model = n2n.load_model(str(src), str(src_arch) if src_arch else None)
        kind = data.draw(st.sampled_from(["widen", "deepen"]), label=f"kind{step}")
        req = data.draw((widen_requests if kind == "widen" else deepen_requests)(model), label=f"request{step}")
        req["noise"] = 0.0
        out = folder / f"step{step}.safetensors"
        args = _cli_args(req)
        cmd = [req["kind"], str(src)] + (["--arch", str(src_arch)] if src_arch else []) + args + ["-o", str(out), "--probes", "8"]
        before = sorted(os.listdir(folder))
        result = runner.invoke(app, cmd)
        assert result.exit_code in (0, 2), f"{cmd}: exit {result.exit_code}\n{result.output}"
        assert "Traceback" not in result.output
        event(f"cli {req['kind']} exit {result.exit_code}")
        if result.exit_code == 2:
            tallies[kind].refuse()
            lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
            assert lines and lines[-1].startswith("error: "), result.stderr
            assert not lines[-1].startswith("error: <architecture>: node"), f"{cmd} built an invalid student: {lines[-1]}"
            assert not out.exists(), f"{cmd} refused but wrote {out}"
            assert sorted(os.listdir(folder)) == before, "a refused request left files behind"
            continue
        tallies[kind].accept()
        assert sorted(os.listdir(folder)) == sorted(before + [out.name]), "stray files after a write"
        from safetensors import safe_open

        with safe_open(str(out), "pt") as f:
            meta = f.metadata()
        sd = load_file(str(out))
        err = rel_error(want, interpret(meta["n2n.arch"], sd, probes))
        assert err <= REL_TOL[graph.dtype], f"{cmd}: max|Δ|/max|y| = {err:.3g}"
        src, src_arch = out, None  # from here on the checkpoint carries its architecture
    assert teacher.tensors.keys()  # the teacher file is still readable


def _cli_args(req: dict) -> list:
    if req["kind"] == "widen":
        return ["--layer", req["layer"], "--width", str(req["width"]), "--split", req["split"], "--seed", str(req["seed"])]
    args = ["--after", req["after"], "--op", req["op"], "--seed", str(req["seed"])]
    if "activation" in req:
        args += ["--activation", req["activation"]]
    if req.get("batchnorm"):
        args.append("--batchnorm")
    if "kernel_size" in req:
        args += ["--kernel-size", str(req["kernel_size"])]
    if "hidden" in req:
        args += ["--hidden", str(req["hidden"])]
    if "name" in req:
        args += ["--name", req["name"]]
    return args


# ------------------------------------------------------------------------------ the generator


@settings(max_examples=40 if not LONG else 300)
@given(graph=graphs())
def test_generated_graphs_are_valid_and_run_identically(graph):
    """The generator emits valid architectures, and the tool's executor agrees with the
    interpreter on them (so the interpreter is a faithful oracle)."""
    from n2nsurgery.executor import run

    model = n2n.model_from_state_dict(graph.yaml, graph.state_dict)
    probes = graph.probes()
    want = interpret(graph.yaml, graph.state_dict, probes)
    got = run(model, {k: v.to(torch.float64) for k, v in probes.items()}, "cpu", torch.float64)
    assert rel_error(want, got) <= 1e-12
