"""Every op of the first set (docs/ops.md), run through our executor, against torch.nn.

Each test builds a one-node architecture, binds it to the state_dict of the equivalent
``torch.nn`` module (or to no parameters), runs it with :func:`n2nsurgery.executor.run`, and
compares with the module's own output in eval mode: max |Δ| against a tight tolerance. It also
checks that the op's shape rule (``model.shapes``) predicts the shape the op really produces.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from conftest import assert_close
from n2nsurgery import model_from_state_dict
from n2nsurgery.executor import exact_math, run
from n2nsurgery.ops import REGISTRY
from n2nsurgery.ops.base import Interval

TOL = 1e-6  # float32, same kernels on both sides: in practice the difference is exactly 0

FIRST_SET = {
    "linear", "conv1d", "conv2d", "conv3d", "batchnorm",
    "relu", "relu6", "sigmoid", "tanh", "silu", "identity", "leaky_relu", "gelu", "dropout",
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "flatten", "add", "mul", "concat",
}  # fmt: skip


def one_node(op: str, inputs: dict, attrs: dict | None = None, in_=None, name: str = "n") -> str:
    """Architecture YAML with the given inputs (name -> one-sample shape) and one node."""
    doc = {
        "format": "n2n-arch/1",
        "inputs": {k: {"shape": list(s), "dtype": "float32"} for k, s in inputs.items()},
        "nodes": [{"name": name, "op": op, "in": in_ if in_ is not None else list(inputs)[0], **(attrs or {})}],
        "outputs": [name],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def run_one(arch_yaml: str, xs: dict, state: dict | None = None, name: str = "n") -> torch.Tensor:
    """Run the one-node model on batched inputs; also check the shape rule against reality."""
    model = model_from_state_dict(arch_yaml, state or {})
    (out,) = run(model, xs)
    assert tuple(out.shape[1:]) == tuple(model.shapes[name]), (
        f"shape rule says {model.shapes[name]}, the op produced {tuple(out.shape[1:])}"
    )
    return out


def prefixed(module: nn.Module, name: str = "n") -> dict:
    return {f"{name}.{k}": v for k, v in module.state_dict().items()}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_first_set_is_registered():
    assert FIRST_SET <= set(REGISTRY), f"missing: {sorted(FIRST_SET - set(REGISTRY))}"


# ------------------------------------------------------------------------------------ linear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("sample", [(7,), (5, 7)], ids=["vector", "sequence"])
def test_linear(bias, sample):
    m = nn.Linear(7, 4, bias=bias).eval()
    x = torch.randn(3, *sample)
    got = run_one(one_node("linear", {"x": sample}), {"x": x}, prefixed(m))
    assert_close(got, m(x), TOL)


# -------------------------------------------------------------------------------------- conv

CONV_CASES = [
    # (nd, in_ch, out_ch, kernel, stride, padding, dilation, groups, bias, spatial)
    (1, 4, 6, 3, 1, 0, 1, 1, True, (11,)),
    (1, 4, 6, 5, 2, 2, 1, 2, False, (13,)),
    (1, 6, 6, 3, 1, 2, 2, 6, True, (10,)),  # depthwise, dilated
    (1, 4, 8, 3, 1, "same", 2, 1, True, (9,)),
    (2, 3, 8, 3, 1, 1, 1, 1, True, (8, 6)),
    (2, 4, 6, 3, 2, 1, 1, 2, True, (9, 7)),  # grouped, strided
    (2, 4, 8, (3, 1), (2, 1), (1, 0), (1, 1), 1, False, (8, 5)),  # per-axis attributes
    (2, 8, 8, 3, 1, 2, 2, 8, True, (7, 7)),  # depthwise, dilated
    (2, 4, 4, 4, 1, "same", 1, 1, True, (6, 5)),  # even kernel, 'same'
    (2, 3, 5, 3, 1, "valid", 1, 1, True, (6, 6)),
    (3, 2, 4, 3, 1, 1, 1, 1, True, (5, 4, 3)),
    (3, 4, 4, (1, 3, 3), (1, 2, 2), (0, 1, 1), 1, 2, False, (3, 6, 5)),
    (3, 3, 6, 2, 1, 0, 2, 3, True, (5, 5, 5)),
]


def _yaml_value(v):
    return list(v) if isinstance(v, tuple) else v


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"conv{c[0]}d-k{c[3]}-s{c[4]}-p{c[5]}-d{c[6]}-g{c[7]}")
@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_conv(case):
    nd, cin, cout, k, stride, padding, dilation, groups, bias, spatial = case
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    m = cls(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias).eval()
    attrs = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    arch = one_node(f"conv{nd}d", {"x": (cin, *spatial)}, {a: _yaml_value(v) for a, v in attrs.items()})
    x = torch.randn(2, cin, *spatial)
    assert_close(run_one(arch, {"x": x}, prefixed(m)), m(x), TOL)


# --------------------------------------------------------------------------------- batchnorm


def _trained_stats(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """Running statistics and affine parameters far from their defaults, as after training."""
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c) * 2)
        bn.running_var.copy_(torch.rand(c) * 3 + 0.1)
        if bn.affine:
            bn.weight.copy_(torch.randn(c))
            bn.bias.copy_(torch.randn(c))
    return bn.eval()


@pytest.mark.parametrize(
    "cls, sample",
    [(nn.BatchNorm1d, (6,)), (nn.BatchNorm1d, (6, 9)), (nn.BatchNorm2d, (6, 5, 4)), (nn.BatchNorm3d, (6, 3, 4, 2))],
    ids=["bn1d-features", "bn1d-sequence", "bn2d", "bn3d"],
)
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm(cls, sample, affine):
    m = _trained_stats(cls(6, eps=1e-3, affine=affine))
    x = torch.randn(4, *sample)
    arch = one_node("batchnorm", {"x": sample}, {"eps": 1e-3})
    assert_close(run_one(arch, {"x": x}, prefixed(m)), m(x), TOL)


def test_batchnorm_uses_running_statistics_not_batch_statistics():
    m = _trained_stats(nn.BatchNorm2d(3))
    x = torch.randn(8, 3, 4, 4) * 5 + 3
    got = run_one(one_node("batchnorm", {"x": (3, 4, 4)}), {"x": x}, prefixed(m))
    assert_close(got, m(x), TOL)
    batch_stats = F.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)
    assert float((got - batch_stats.detach()).abs().max()) > 0.1  # the two modes really differ here


# ------------------------------------------------------------------------------- activations

ACTIVATIONS = [
    ("relu", {}, nn.ReLU()),
    ("relu6", {}, nn.ReLU6()),
    ("sigmoid", {}, nn.Sigmoid()),
    ("tanh", {}, nn.Tanh()),
    ("silu", {}, nn.SiLU()),
    ("identity", {}, nn.Identity()),
    ("leaky_relu", {}, nn.LeakyReLU()),
    ("leaky_relu", {"negative_slope": 0.2}, nn.LeakyReLU(0.2)),
    ("leaky_relu", {"negative_slope": -0.5}, nn.LeakyReLU(-0.5)),
    ("gelu", {}, nn.GELU()),
    ("gelu", {"approximate": "tanh"}, nn.GELU(approximate="tanh")),
    ("dropout", {}, nn.Dropout()),
    ("dropout", {"p": 0.9}, nn.Dropout(0.9)),
]


@pytest.mark.parametrize("op, attrs, module", ACTIVATIONS, ids=[f"{a[0]}{a[1] or ''}" for a in ACTIVATIONS])
def test_elementwise(op, attrs, module):
    x = torch.randn(5, 3, 4) * 4  # wide enough to reach relu6's cap and gelu's/silu's dip
    got = run_one(one_node(op, {"x": (3, 4)}, attrs), {"x": x})
    assert_close(got, module.eval()(x), TOL)


def test_leaky_slope_is_applied():
    x = torch.tensor([[-2.0, 3.0]])
    got = run_one(one_node("leaky_relu", {"x": (2,)}, {"negative_slope": 0.25}), {"x": x})
    assert got.tolist() == [[-0.5, 3.0]]


def test_gelu_approximations_differ():
    x = torch.linspace(-3, 3, 101).reshape(1, 101)
    exact = run_one(one_node("gelu", {"x": (101,)}), {"x": x})
    approx = run_one(one_node("gelu", {"x": (101,)}, {"approximate": "tanh"}), {"x": x})
    assert float((exact - approx).abs().max()) > 1e-5  # so the tests above can tell them apart


def test_dropout_is_identity_at_inference():
    x = torch.randn(64, 50)
    got = run_one(one_node("dropout", {"x": (50,)}, {"p": 0.5}), {"x": x})
    assert torch.equal(got, x)


# ----------------------------------------------------------------------------------- pooling

POOLS = [
    # (op, attrs, module, sample)
    ("max_pool1d", {"kernel_size": 2}, nn.MaxPool1d(2), (3, 9)),
    ("max_pool1d", {"kernel_size": 3, "stride": 1, "padding": 1}, nn.MaxPool1d(3, 1, 1), (3, 8)),
    ("max_pool2d", {"kernel_size": 2}, nn.MaxPool2d(2), (3, 8, 6)),
    ("max_pool2d", {"kernel_size": [3, 2], "stride": [2, 1], "padding": [1, 0]}, nn.MaxPool2d((3, 2), (2, 1), (1, 0)), (2, 7, 5)),
    ("max_pool3d", {"kernel_size": 2, "stride": 1}, nn.MaxPool3d(2, 1), (2, 4, 5, 3)),
    ("avg_pool1d", {"kernel_size": 3}, nn.AvgPool1d(3), (3, 10)),
    ("avg_pool1d", {"kernel_size": 3, "stride": 2, "padding": 1}, nn.AvgPool1d(3, 2, 1), (3, 10)),
    ("avg_pool2d", {"kernel_size": 2}, nn.AvgPool2d(2), (3, 8, 6)),
    ("avg_pool2d", {"kernel_size": 3, "stride": 1, "padding": 1}, nn.AvgPool2d(3, 1, 1), (2, 5, 5)),
    ("avg_pool3d", {"kernel_size": [1, 2, 2]}, nn.AvgPool3d((1, 2, 2)), (2, 3, 4, 6)),
    ("avg_pool3d", {"kernel_size": 3, "stride": 2, "padding": 1}, nn.AvgPool3d(3, 2, 1), (2, 5, 5, 5)),
    ("adaptive_avg_pool1d", {"output_size": 1}, nn.AdaptiveAvgPool1d(1), (3, 10)),
    ("adaptive_avg_pool1d", {"output_size": 4}, nn.AdaptiveAvgPool1d(4), (3, 10)),  # uneven windows
    ("adaptive_avg_pool2d", {"output_size": 1}, nn.AdaptiveAvgPool2d(1), (3, 7, 5)),
    ("adaptive_avg_pool2d", {"output_size": [3, 2]}, nn.AdaptiveAvgPool2d((3, 2)), (3, 7, 5)),
    ("adaptive_avg_pool3d", {"output_size": 2}, nn.AdaptiveAvgPool3d(2), (2, 5, 4, 3)),
    ("adaptive_max_pool1d", {"output_size": 3}, nn.AdaptiveMaxPool1d(3), (3, 10)),
    ("adaptive_max_pool2d", {"output_size": [2, 3]}, nn.AdaptiveMaxPool2d((2, 3)), (3, 7, 5)),
    ("adaptive_max_pool2d", {"output_size": 1}, nn.AdaptiveMaxPool2d(1), (3, 7, 5)),
    ("adaptive_max_pool3d", {"output_size": [1, 2, 2]}, nn.AdaptiveMaxPool3d((1, 2, 2)), (2, 5, 4, 3)),
]


@pytest.mark.parametrize("op, attrs, module, sample", POOLS, ids=[f"{p[0]}-{i}" for i, p in enumerate(POOLS)])
def test_pool(op, attrs, module, sample):
    x = torch.randn(3, *sample)
    got = run_one(one_node(op, {"x": sample}, attrs), {"x": x})
    assert_close(got, module.eval()(x), TOL)


# ------------------------------------------------------------------------------- shape ops


@pytest.mark.parametrize(
    "start, end, sample",
    [(1, -1, (3, 4, 5)), (2, -1, (3, 4, 5)), (1, 2, (3, 4, 5)), (-2, -1, (3, 4, 5)), (2, 2, (3, 4, 5)), (1, -1, (7,)), (2, 3, (2, 3, 4, 5))],
)
def test_flatten(start, end, sample):
    x = torch.randn(2, *sample)
    got = run_one(one_node("flatten", {"x": sample}, {"start_dim": start, "end_dim": end}), {"x": x})
    assert_close(got, nn.Flatten(start, end)(x), 0.0)


def test_flatten_defaults_keep_the_batch():
    x = torch.randn(4, 3, 2, 5)
    got = run_one(one_node("flatten", {"x": (3, 2, 5)}), {"x": x})
    assert_close(got, x.reshape(4, 30), 0.0)


# -------------------------------------------------------------------------------- merge ops


@pytest.mark.parametrize("op, fn", [("add", torch.add), ("mul", torch.mul)])
@pytest.mark.parametrize(
    "shapes",
    [[(3, 4), (3, 4)], [(3, 4), (3, 4), (3, 4)], [(3, 1, 5), (3, 4, 1)], [(1, 4), (6, 4)], [(6, 1, 1), (6, 5, 4)]],
    ids=["same", "three", "both-broadcast", "row", "per-channel"],
)
def test_add_mul_broadcasting(op, fn, shapes):
    names = [f"x{i}" for i in range(len(shapes))]
    xs = {n: torch.randn(5, *s) for n, s in zip(names, shapes)}
    got = run_one(one_node(op, dict(zip(names, shapes)), in_=names), xs)
    want = xs[names[0]]
    for n in names[1:]:
        want = fn(want, xs[n])
    assert_close(got, want, TOL)


@pytest.mark.parametrize("op, fn", [("add", torch.add), ("mul", torch.mul)])
def test_add_mul_broadcast_lower_rank(op, fn):
    a, b = torch.randn(5, 3), torch.randn(5, 4, 5, 3)  # batch 5: the silent case
    got = run_one(one_node(op, {"a": (3,), "b": (4, 5, 3)}, in_=["a", "b"]), {"a": a, "b": b})
    assert_close(got, fn(a[:, None, None, :], b), TOL)


@pytest.mark.parametrize(
    "dim, shapes",
    [(1, [(2, 4, 4), (3, 4, 4)]), (1, [(2, 3), (4, 3), (1, 3)]), (2, [(2, 3, 4), (2, 5, 4)]), (-1, [(2, 3, 4), (2, 3, 1)]), (-1, [(4,), (6,)])],
)
def test_concat(dim, shapes):
    names = [f"x{i}" for i in range(len(shapes))]
    xs = {n: torch.randn(3, *s) for n, s in zip(names, shapes)}
    got = run_one(one_node("concat", dict(zip(names, shapes)), {"dim": dim}, in_=names), xs)
    assert_close(got, torch.cat([xs[n] for n in names], dim), 0.0)


def test_concat_same_tensor_twice():
    x = torch.randn(2, 3, 4)
    got = run_one(one_node("concat", {"x": (3, 4)}, in_=["x", "x"]), {"x": x})
    assert_close(got, torch.cat([x, x], 1), 0.0)


def test_every_first_set_op_has_a_forward_test():
    tested = {"linear", "batchnorm", "flatten", "add", "mul", "concat"}
    tested |= {f"conv{c[0]}d" for c in CONV_CASES} | {a[0] for a in ACTIVATIONS} | {p[0] for p in POOLS}
    assert FIRST_SET <= tested, f"ops without a forward test: {sorted(FIRST_SET - tested)}"


# ---------------------------------------------------------------------------------- executor


def test_executor_runs_half_precision_checkpoints_in_float32():
    m = nn.Linear(6, 3)
    state = {f"n.{k}": v.to(torch.bfloat16) for k, v in m.state_dict().items()}
    x = torch.randn(4, 6)
    model = model_from_state_dict(one_node("linear", {"x": (6,)}), state)
    (got,) = run(model, {"x": x})
    assert got.dtype == torch.float32
    want = F.linear(x, state["n.weight"].float(), state["n.bias"].float())
    assert_close(got, want, TOL)


def test_executor_runs_float64_checkpoints_in_float64():
    m = nn.Linear(6, 3).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    (got,) = run(model_from_state_dict(one_node("linear", {"x": (6,)}), prefixed(m)), {"x": x})
    assert got.dtype == torch.float64
    assert_close(got, m(x), 1e-12)


def test_executor_multiple_outputs_in_declared_order():
    arch = """
format: n2n-arch/1
inputs: {x: {shape: [4], dtype: float32}}
nodes:
  - {name: r, op: relu, in: x}
  - {name: t, op: tanh, in: r}
outputs: [t, r]
"""
    x = torch.randn(3, 4)
    t, r = run(model_from_state_dict(arch, {}), {"x": x})
    assert_close(r, torch.relu(x), 0.0)
    assert_close(t, torch.tanh(torch.relu(x)), 0.0)


def test_exact_math_turns_tf32_off_and_restores_it():
    mm = torch.backends.cuda.matmul
    saved = (mm.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    try:
        mm.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("medium")
        with exact_math():
            assert not mm.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
            assert torch.get_float32_matmul_precision() == "highest"
            assert torch.is_inference_mode_enabled()
        assert mm.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        mm.allow_tf32, torch.backends.cudnn.allow_tf32, precision = saved
        torch.set_float32_matmul_precision(precision)


# ------------------------------------------------------------------------------ value ranges
# deepen trusts value_range to prove φ(v) = v on every value a node can produce, so a range
# must contain every output the op really gives (it may be wider, never narrower).

RANGE_CASES = [
    ("relu", {}), ("relu6", {}), ("identity", {}), ("dropout", {"p": 0.5}),
    ("leaky_relu", {"negative_slope": 0.01}), ("leaky_relu", {"negative_slope": -0.5}),
    ("sigmoid", {}), ("tanh", {}), ("silu", {}), ("gelu", {"approximate": "none"}), ("gelu", {"approximate": "tanh"}),
]  # fmt: skip
INTERVALS = [(-math.inf, math.inf), (0, math.inf), (-math.inf, -1), (-5, -2), (-3, -0.1), (-1, 2), (0.5, 3), (7, 9)]


@pytest.mark.parametrize("op, attrs", RANGE_CASES, ids=[f"{op}{attrs or ''}" for op, attrs in RANGE_CASES])
def test_value_range_contains_every_output(op, attrs):
    opdef = REGISTRY[op]
    for lo, hi in INTERVALS:
        claimed = opdef.value_range([Interval(lo, hi)], attrs)
        x = torch.linspace(max(lo, -40.0), min(hi, 40.0), 20001, dtype=torch.float64)
        y = opdef.forward([x], {}, attrs)
        assert claimed.lo <= float(y.min()) and float(y.max()) <= claimed.hi, (
            f"{op} on [{lo}, {hi}]: claimed {claimed}, outputs span [{float(y.min()):.6g}, {float(y.max()):.6g}]"
        )
