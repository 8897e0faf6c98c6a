"""The model-zoo ops (issue 16): forward against torch itself, widening through each against the
same torch.nn module built at the new width, and each refusal with its reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from n2nsurgery.cli import app
from n2nsurgery.errors import N2NError
from n2nsurgery.executor import run
from n2nsurgery.model import model_from_state_dict
from n2nsurgery.widen import widen

TOL = 1e-5


def one_node(op: str, shape, attrs: str = "", params=None):
    """A model of one node `op` reading input x of one-sample `shape`."""
    extra = f", {attrs}" if attrs else ""
    arch = (
        "format: n2n-arch/1\nname: t\ninputs:\n"
        f"  x: {{shape: {list(shape)}, dtype: float32}}\n"
        f"nodes:\n  - {{name: n, op: {op}, in: x{extra}}}\noutputs: [n]\n"
    )
    return model_from_state_dict(arch, {f"n.{k}": v for k, v in (params or {}).items()})


def forward(model, x):
    return run(model, {"x": x}, dtype=torch.float32)[0]


# ------------------------------------------------------------------------------ forward oracles


@pytest.mark.parametrize(
    "op,attrs,shape,want",
    [
        ("hardswish", "", (4, 5), nn.Hardswish()),
        ("hardsigmoid", "", (4, 5), nn.Hardsigmoid()),
        ("softmax", "dim: 1", (4, 5), nn.Softmax(dim=1)),
        ("softmax", "dim: -1", (4, 5), nn.Softmax(dim=-1)),
        ("stochastic_depth", "p: 0.2", (4, 5), nn.Identity()),
        ("mean", "dim: [2, 3]", (4, 5, 6), lambda x: x.mean((2, 3))),
        ("mean", "dim: -1, keepdim: true", (4, 5, 6), lambda x: x.mean(-1, keepdim=True)),
        ("permute", "dims: [0, 2, 3, 1]", (4, 5, 6), lambda x: x.permute(0, 2, 3, 1)),
        ("transpose", "dim0: 1, dim1: -1", (4, 5, 6), lambda x: x.transpose(1, -1)),
        ("reshape", "shape: [4, -1]", (4, 5, 6), lambda x: x.reshape(x.shape[0], 4, 30)),
        ("max_pool2d", "kernel_size: 3, stride: 2, ceil_mode: true", (4, 8, 8), nn.MaxPool2d(3, 2, ceil_mode=True)),
        ("max_pool2d", "kernel_size: 3, stride: 2, padding: 1, ceil_mode: true", (4, 7, 6), nn.MaxPool2d(3, 2, 1, ceil_mode=True)),
        ("max_pool1d", "kernel_size: 2, ceil_mode: true", (4, 7), nn.MaxPool1d(2, ceil_mode=True)),
    ],
)
def test_forward_matches_torch(op, attrs, shape, want):
    model = one_node(op, shape, attrs)
    x = torch.randn((3,) + tuple(shape)) * 4
    got = forward(model, x)
    expected = want(x)
    assert got.shape == expected.shape  # the shape rule agrees with torch too
    assert model.shapes["n"] == tuple(expected.shape[1:])
    assert torch.allclose(got, expected, atol=1e-6)


def test_groupnorm_forward():
    gn = nn.GroupNorm(4, 8, eps=1e-3)
    with torch.no_grad():
        gn.weight.normal_(), gn.bias.normal_()
    model = one_node("groupnorm", (8, 5, 5), "num_groups: 4, eps: 0.001", {"weight": gn.weight.detach(), "bias": gn.bias.detach()})
    x = torch.randn(3, 8, 5, 5)
    assert torch.allclose(forward(model, x), gn(x), atol=1e-5)


def test_layer_scale_forward_both_layouts():
    g = torch.randn(6)
    x = torch.randn(2, 4, 5, 6)
    assert torch.allclose(forward(one_node("layer_scale", (4, 5, 6), params={"weight": g}), x), x * g)
    g3 = torch.randn(4, 1, 1)
    assert torch.allclose(forward(one_node("layer_scale", (4, 5, 6), params={"weight": g3}), x), x * g3)


@pytest.mark.parametrize(
    "op,attrs,shape,params,needle",
    [
        ("groupnorm", "num_groups: 3", (8, 4), {}, "does not divide the 8 channels"),
        ("softmax", "dim: 4", (4, 5), {}, "out of range"),
        ("permute", "dims: [0, 1]", (4, 5), {}, "has 2 entries"),
        ("reshape", "shape: [7, -1]", (4, 5), {}, "does not fit"),
        ("layer_scale", "", (4, 5), {"weight": torch.ones(4)}, "which has 5 units"),
    ],
)
def test_shape_errors_name_the_problem(op, attrs, shape, params, needle):
    with pytest.raises(N2NError, match=needle):
        one_node(op, shape, attrs, params)


def test_value_ranges():
    from n2nsurgery.ops import Interval, get_op

    wide = [Interval()]
    assert get_op("hardsigmoid").value_range(wide, {}) == Interval(0.0, 1.0)
    assert get_op("hardswish").value_range(wide, {}).lo == -0.375
    assert get_op("softmax").value_range(wide, {"dim": 1}) == Interval(0.0, 1.0)


# ------------------------------------------------------------------------------ widening


class Block(nn.Module):
    """conv -> bn -> <op> -> conv: widened at conv1, the op in between passes the channels."""

    def __init__(self, c: int = 6, tail=None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.mid = tail(c) if tail else nn.Identity()
        self.conv2 = nn.Conv2d(c, 5, 1)

    def forward(self, x):
        return self.conv2(self.mid(self.bn1(self.conv1(x))))


def _randomise(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "var" in name else torch.randn_like(t))
    return module.eval()


def _widened_matches(make, yaml_nodes: str, layer: str, width: int, x, split=None):
    teacher = _randomise(make(None))
    arch = "format: n2n-arch/1\nname: t\ninputs:\n  x: {shape: " + str(list(x.shape[1:])) + ", dtype: float32}\nnodes:\n" + yaml_nodes
    model = model_from_state_dict(arch, teacher.state_dict())
    student_model, _ = widen(model, layer, width, split=split)
    student = make(width)
    student.load_state_dict(student_model.tensors.to_dict(), strict=True)
    student.eval()
    with torch.no_grad():
        want, got = teacher(x), student(x)
    assert (got - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item())
    return student_model


_CONV_BN = "  - {name: conv1, op: conv2d, in: x, padding: 1}\n  - {name: bn1, op: batchnorm, in: conv1}\n"


@pytest.mark.parametrize(
    "op,attrs,module",
    [
        ("hardswish", "", lambda c: nn.Hardswish()),
        ("hardsigmoid", "", lambda c: nn.Hardsigmoid()),
        ("stochastic_depth", ", p: 0.1", lambda c: nn.Identity()),
        ("softmax", ", dim: -1", lambda c: nn.Softmax(dim=-1)),
    ],
)
@pytest.mark.parametrize("split", [None, "tile"])
def test_elementwise_ops_pass_channels(op, attrs, module, split):
    make = lambda w: Block(w or 6, module)  # noqa: E731
    nodes = _CONV_BN + f"  - {{name: mid, op: {op}, in: bn1{attrs}}}\n  - {{name: conv2, op: conv2d, in: mid}}\noutputs: [conv2]\n"
    _widened_matches(make, nodes, "conv1", 12, torch.randn(4, 3, 5, 5), split=split)


class LayerScaleBlock(nn.Module):
    """ConvNeXt-like: conv -> permute to channels last -> layer scale [C] -> permute back -> conv,
    and the channels-first [C, 1, 1] form."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.ls = nn.Module()
        self.ls.weight = nn.Parameter(torch.randn(c))
        self.ls2 = nn.Module()
        self.ls2.weight = nn.Parameter(torch.randn(c, 1, 1))
        self.conv2 = nn.Conv2d(c, 5, 1)

    def forward(self, x):
        y = self.conv1(x).permute(0, 2, 3, 1) * self.ls.weight
        y = y.transpose(1, 3).transpose(2, 3) * self.ls2.weight  # back to channels first
        return self.conv2(y)


def test_layer_scale_permute_transpose_widen():
    nodes = (
        "  - {name: conv1, op: conv2d, in: x, padding: 1}\n"
        "  - {name: p, op: permute, in: conv1, dims: [0, 2, 3, 1]}\n"
        "  - {name: ls, op: layer_scale, in: p}\n"
        "  - {name: t1, op: transpose, in: ls, dim0: 1, dim1: 3}\n"
        "  - {name: t2, op: transpose, in: t1, dim0: 2, dim1: 3}\n"
        "  - {name: ls2, op: layer_scale, in: t2}\n"
        "  - {name: conv2, op: conv2d, in: ls2}\noutputs: [conv2]\n"
    )
    _widened_matches(lambda w: LayerScaleBlock(w or 6), nodes, "conv1", 11, torch.randn(4, 3, 5, 4))


class MeanHead(nn.Module):
    """conv -> mean over H, W -> reshape (channels kept whole) -> linear."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        y = self.conv1(x).mean((2, 3), keepdim=True)
        return self.fc(y.reshape(y.shape[0], -1))


@pytest.mark.parametrize("shape", ["[-1]", "[6]"])
def test_mean_and_reshape_widen(shape):
    nodes = (
        "  - {name: conv1, op: conv2d, in: x, padding: 1}\n"
        "  - {name: m, op: mean, in: conv1, dim: [2, 3], keepdim: true}\n"
        f"  - {{name: r, op: reshape, in: m, shape: {shape}}}\n"
        "  - {name: fc, op: linear, in: r}\noutputs: [fc]\n"
    )
    student = _widened_matches(lambda w: MeanHead(w or 6), nodes, "conv1", 10, torch.randn(4, 3, 5, 5))
    if shape == "[6]":  # the explicit size grew with the channels
        node = next(n for n in student.arch.nodes if n.name == "r")
        assert list(node.resolved_attrs()["shape"]) == [10]


class SqueezeExcite(nn.Module):
    """conv -> SE (mean, reduce conv, relu, expand conv, hardsigmoid gate) -> mul -> conv."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.reduce = nn.Conv2d(c, 3, 1)
        self.expand = nn.Conv2d(3, c, 1)
        self.conv2 = nn.Conv2d(c, 5, 1)

    def forward(self, x):
        y = self.conv1(x)
        gate = F.hardsigmoid(self.expand(F.relu(self.reduce(y.mean((2, 3), keepdim=True)))))
        return self.conv2(y * gate)


def test_squeeze_excitation_gate_path():
    nodes = (
        "  - {name: conv1, op: conv2d, in: x, padding: 1}\n"
        "  - {name: pool, op: mean, in: conv1, dim: [2, 3], keepdim: true}\n"
        "  - {name: reduce, op: conv2d, in: pool}\n"
        "  - {name: act, op: relu, in: reduce}\n"
        "  - {name: expand, op: conv2d, in: act}\n"
        "  - {name: gate, op: hardsigmoid, in: expand}\n"
        "  - {name: scaled, op: mul, in: [conv1, gate]}\n"
        "  - {name: conv2, op: conv2d, in: scaled}\noutputs: [conv2]\n"
    )
    # conv1's units reach the reduce conv's columns (through the mean) and the mul, whose gate
    # side pulls in the expand conv's rows: one group, widened exactly together.
    _widened_matches(lambda w: SqueezeExcite(w or 6), nodes, "conv1", 10, torch.randn(4, 3, 5, 5))


# ------------------------------------------------------------------------------ refusals


def _refusal(nodes: str, shape, params, layer="conv1", width=12):
    arch = "format: n2n-arch/1\nname: t\ninputs:\n  x: {shape: " + str(list(shape)) + ", dtype: float32}\nnodes:\n" + nodes
    model = model_from_state_dict(arch, params)
    with pytest.raises(N2NError) as err:
        widen(model, layer, width)
    return str(err.value)


def _conv_params(c=6, extra=None):
    p = {"conv1.weight": torch.randn(c, 3, 1, 1), "conv2.weight": torch.randn(5, c, 1, 1)}
    p.update(extra or {})
    return p


def test_softmax_over_channels_refused():
    nodes = "  - {name: conv1, op: conv2d, in: x}\n  - {name: s, op: softmax, in: conv1, dim: 1}\n  - {name: conv2, op: conv2d, in: s}\noutputs: [conv2]\n"
    assert "softmax over the widened axis" in _refusal(nodes, (3, 4, 4), _conv_params())


def test_mean_over_channels_refused():
    nodes = "  - {name: conv1, op: conv2d, in: x}\n  - {name: m, op: mean, in: conv1, dim: 1, keepdim: true}\n  - {name: conv2, op: conv2d, in: m}\noutputs: [conv2]\n"
    params = {"conv1.weight": torch.randn(6, 3, 1, 1), "conv2.weight": torch.randn(5, 1, 1, 1)}
    assert "mean over the widened axis" in _refusal(nodes, (3, 4, 4), params)


class GroupNormBlock(nn.Module):
    """conv -> groupnorm (3 groups) -> relu -> conv."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.gn = nn.GroupNorm(3, c)
        self.conv2 = nn.Conv2d(c, 5, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.gn(self.conv1(x))))


_GN_NODES = (
    "  - {name: conv1, op: conv2d, in: x, padding: 1}\n"
    "  - {name: gn, op: groupnorm, in: conv1, num_groups: 3}\n"
    "  - {name: act, op: relu, in: gn}\n"
    "  - {name: conv2, op: conv2d, in: act}\noutputs: [conv2]\n"
)


@pytest.mark.parametrize("width,split", [(12, None), (18, "tile")])
def test_groupnorm_widens_by_per_group_tile(width, split):
    _widened_matches(lambda w: GroupNormBlock(w or 6), _GN_NODES, "conv1", width, torch.randn(4, 3, 5, 5), split=split)


@pytest.mark.parametrize(
    "width,split,needle",
    [
        (9, None, "multiple of 6"),  # a tile needs k whole copies of every group
        (7, None, "multiple of 3"),  # not even every group alike
        (12, "equal", "only the fill modes tile"),  # a random copy weighs channels unevenly
    ],
)
def test_groupnorm_refusals_name_what_works(width, split, needle):
    arch = "format: n2n-arch/1\nname: t\ninputs:\n  x: {shape: [3, 5, 5], dtype: float32}\nnodes:\n" + _GN_NODES
    model = model_from_state_dict(arch, _randomise(GroupNormBlock()).state_dict())
    with pytest.raises(N2NError, match=needle) as err:
        widen(model, "conv1", width, split=split)
    assert "'gn'" in str(err.value) or "tile" in str(err.value)


SHUFFLE = (
    "  - {name: conv1, op: conv2d, in: x}\n"
    "  - {name: split, op: reshape, in: conv1, shape: [2, 3, 4, 4]}\n"
    "  - {name: swap, op: transpose, in: split, dim0: 1, dim1: 2}\n"
    "  - {name: merge, op: reshape, in: swap, shape: [6, 4, 4]}\n"
    "  - {name: conv2, op: conv2d, in: merge}\noutputs: [conv2]\n"
)


def test_channel_shuffle_refused():
    assert "a channel shuffle interleaves groups" in _refusal(SHUFFLE, (3, 4, 4), _conv_params())


def test_channel_shuffle_forward_matches_torch():
    p = _conv_params()
    arch = "format: n2n-arch/1\nname: t\ninputs:\n  x: {shape: [3, 4, 4], dtype: float32}\nnodes:\n" + SHUFFLE
    model = model_from_state_dict(arch, p)
    x = torch.randn(2, 3, 4, 4)
    y = F.conv2d(x, p["conv1.weight"]).reshape(2, 2, 3, 4, 4).transpose(1, 2).reshape(2, 6, 4, 4)
    assert torch.allclose(forward(model, x), F.conv2d(y, p["conv2.weight"]), atol=1e-5)


def test_refusal_through_the_cli_exits_2(runner, tmp_path):
    nodes = "  - {name: conv1, op: conv2d, in: x}\n  - {name: s, op: softmax, in: conv1, dim: 1}\n  - {name: conv2, op: conv2d, in: s}\noutputs: [conv2]\n"
    arch = tmp_path / "t.yaml"
    arch.write_text("format: n2n-arch/1\nname: t\ninputs:\n  x: {shape: [3, 4, 4], dtype: float32}\nnodes:\n" + nodes)
    ckpt = tmp_path / "t.safetensors"
    save_file(_conv_params(), str(ckpt))
    result = runner.invoke(app, ["widen", str(ckpt), "--arch", str(arch), "--layer", "conv1", "--width", "12", "-o", str(tmp_path / "s.safetensors")])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and "softmax over the widened axis" in lines[-1]
    assert "Traceback" not in result.output
