"""Grouped convolutions widen exactly (issue 16): every group grows alike, laid out group by
group, `groups` unchanged. The oracle is torch: the student loads into the same module class at
the new width and gives the teacher's outputs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from n2nsurgery.cli import app
from n2nsurgery.errors import N2NError
from n2nsurgery.model import model_from_state_dict
from n2nsurgery.ops.units import UnitMap
from n2nsurgery.widen import widen

TOL = 1e-5
G = 4


class RegNetBlock(nn.Module):
    """1x1 conv -> bn -> relu -> grouped 3x3 conv (groups 4) -> bn -> relu -> 1x1 conv."""

    def __init__(self, a: int = 8, b: int = 12):
        super().__init__()
        self.conv_a = nn.Conv2d(3, a, 1)
        self.bn_a = nn.BatchNorm2d(a)
        self.conv_b = nn.Conv2d(a, b, 3, padding=1, groups=G)
        self.bn_b = nn.BatchNorm2d(b)
        self.conv_c = nn.Conv2d(b, 5, 1)

    def forward(self, x):
        y = torch.relu(self.bn_a(self.conv_a(x)))
        y = torch.relu(self.bn_b(self.conv_b(y)))
        return self.conv_c(y)


ARCH = """\
format: n2n-arch/1
name: regnet_block
inputs:
  x: {shape: [3, 6, 6], dtype: float32}
nodes:
  - {name: conv_a, op: conv2d, in: x}
  - {name: bn_a, op: batchnorm, in: conv_a}
  - {name: relu_a, op: relu, in: bn_a}
  - {name: conv_b, op: conv2d, in: relu_a, padding: 1, groups: 4}
  - {name: bn_b, op: batchnorm, in: conv_b}
  - {name: relu_b, op: relu, in: bn_b}
  - {name: conv_c, op: conv2d, in: relu_b}
outputs: [conv_c]
"""


def _teacher():
    torch.manual_seed(0)
    m = RegNetBlock()
    with torch.no_grad():
        for name, t in m.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "var" in name else torch.randn_like(t))
    return m.eval()


@pytest.mark.parametrize(
    "layer,width,widths,split",
    [
        ("conv_a", 16, {"a": 16}, None),  # the layer feeding the grouped conv: its columns per group
        ("conv_a", 12, {"a": 12}, "random"),  # 2 -> 3 channels per group, random shares
        ("conv_a", 16, {"a": 16}, "tile"),
        ("conv_b", 20, {"b": 20}, None),  # the grouped conv itself: its rows per group
        ("conv_b", 24, {"b": 24}, "tile"),
        ("conv_b", 16, {"b": 16}, "random"),
    ],
)
def test_regnet_block_widens_exactly(layer, width, widths, split):
    teacher = _teacher()
    model = model_from_state_dict(ARCH, teacher.state_dict())
    student_model, _ = widen(model, layer, width, split=split, seed=3)
    student = RegNetBlock(**widths)
    student.load_state_dict(student_model.tensors.to_dict(), strict=True)
    student.eval()
    node = next(n for n in student_model.arch.nodes if n.name == "conv_b")
    assert node.resolved_attrs()["groups"] == G  # groups stay; channels per group grow
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        want, got = teacher(x), student(x)
    assert (got - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item())


def test_new_channels_copy_their_own_group():
    model = model_from_state_dict(ARCH, _teacher().state_dict())
    student, _ = widen(model, "conv_b", 24, seed=1)
    w_old, w_new = model.tensors.get("conv_b.weight"), student.tensors.get("conv_b.weight")
    for row in range(24):  # group k of the student holds rows [6k, 6k+6), copies of old rows [3k, 3k+3)
        k = row // 6
        assert any(torch.equal(w_new[row], w_old[src]) for src in range(3 * k, 3 * k + 3)), row


@pytest.mark.parametrize("layer,width", [("conv_a", 14), ("conv_b", 18)])
def test_width_not_a_multiple_of_groups_is_refused(layer, width):
    model = model_from_state_dict(ARCH, _teacher().state_dict())
    with pytest.raises(N2NError, match=rf"4 groups .* multiple of 4 \(got {width}, "):
        widen(model, layer, width)


def test_refusal_through_the_cli(runner, tmp_path):
    ckpt, arch = tmp_path / "t.safetensors", tmp_path / "t.yaml"
    save_file({k: v.contiguous() for k, v in _teacher().state_dict().items()}, str(ckpt))
    arch.write_text(ARCH)
    result = runner.invoke(app, ["widen", str(ckpt), "--arch", str(arch), "--layer", "conv_a", "--width", "10", "-o", str(tmp_path / "s.safetensors")])
    assert result.exit_code == 2, result.output
    assert "error: " in result.output and "'conv_b'" in result.output and "got 10" in result.output


def test_cli_widen_verifies(runner, tmp_path):
    ckpt, arch = tmp_path / "t.safetensors", tmp_path / "t.yaml"
    save_file({k: v.contiguous() for k, v in _teacher().state_dict().items()}, str(ckpt))
    arch.write_text(ARCH)
    result = runner.invoke(app, ["widen", str(ckpt), "--arch", str(arch), "--layer", "conv_a", "--width", "16", "-o", str(tmp_path / "s.safetensors")])
    assert result.exit_code == 0, result.output


def test_per_group_map_round_trip():
    gen = torch.Generator().manual_seed(0)
    m = UnitMap.draw(8, 12, "random", gen, groups=4)
    inner = m.per_group(4)
    assert inner is not None and inner.old_size == 2 and inner.size == 3
    assert m.same_as(inner.along((4, 2), 1))
    tile = UnitMap.draw(8, 16, "equal", gen, fill="tile")  # j mod 8: moves channels across groups
    assert tile.per_group(4) is None


def test_groups_broken_by_a_concat_are_refused():
    """Widening one side of a concat appends its new channels inside that segment only, which moves
    the other segment's channels into other groups of the grouped conv after it."""
    arch = """\
format: n2n-arch/1
inputs:
  x: {shape: [3, 4, 4]}
nodes:
  - {name: a, op: conv2d, in: x}
  - {name: b, op: conv2d, in: x}
  - {name: cat, op: concat, in: [a, b], dim: 1}
  - {name: g, op: conv2d, in: cat, groups: 4}
  - {name: out, op: conv2d, in: g}
outputs: [out]
"""
    shapes = {"a.weight": (4, 3, 1, 1), "b.weight": (4, 3, 1, 1), "g.weight": (8, 2, 1, 1), "out.weight": (2, 8, 1, 1)}
    model = model_from_state_dict(arch, {k: torch.randn(s) for k, s in shapes.items()})
    with pytest.raises(N2NError, match="'g'.*grow every group alike"):
        widen(model, "a", 8)


def test_inspect_marks_grouped_layers_widenable_at_multiples_of_the_groups(runner, tmp_path):
    """Widening by one unit is refused here, but every multiple of 4 is exact: inspect says so
    (JSON `multiple_of`, the table's 'yes (width a multiple of 4)') instead of 'no'."""
    from n2nsurgery.inspect import describe

    model = model_from_state_dict(ARCH, _teacher().state_dict())
    info = {n["name"]: n["widen"] for n in describe(model)["nodes"] if n["widen"] is not None}
    assert info["conv_a"]["multiple_of"] == 4 and info["conv_b"]["multiple_of"] == 4
    assert "multiple_of" not in info["conv_c"] and "refused" in info["conv_c"]  # the output layer
    ckpt, arch = tmp_path / "t.safetensors", tmp_path / "t.yaml"
    save_file({k: v.contiguous() for k, v in _teacher().state_dict().items()}, str(ckpt))
    arch.write_text(ARCH)
    result = runner.invoke(app, ["inspect", str(ckpt), "--arch", str(arch)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "yes (width a multiple of 4)" in result.output


def test_inspect_marks_a_tile_only_group_widenable_at_multiples_of_its_width():
    """Through a layer norm under a depthwise conv only a uniform k-fold copy (tile) is exact:
    the widths are the multiples of the current one."""
    from n2nsurgery.inspect import describe

    arch = """\
format: n2n-arch/1
name: tile_only
inputs:
  x: {shape: [3, 4, 4], dtype: float32}
nodes:
  - {name: stem, op: conv2d, in: x}
  - {name: dw, op: conv2d, in: stem, padding: 1, groups: 6}
  - {name: last, op: permute, in: dw, dims: [0, 2, 3, 1]}
  - {name: norm, op: layernorm, in: last}
  - {name: head, op: linear, in: norm}
outputs: [head]
"""
    torch.manual_seed(0)
    tensors = {"stem.weight": torch.randn(6, 3, 1, 1), "stem.bias": torch.randn(6), "dw.weight": torch.randn(6, 1, 3, 3),
               "dw.bias": torch.randn(6), "norm.weight": torch.rand(6) + 0.5, "norm.bias": torch.randn(6),
               "head.weight": torch.randn(2, 6), "head.bias": torch.randn(2)}
    model = model_from_state_dict(arch, tensors)
    info = {n["name"]: n["widen"] for n in describe(model)["nodes"] if n["widen"] is not None}
    assert info["stem"]["multiple_of"] == 6
    student, _ = widen(model, "stem", 12)
    assert student.shapes["stem"][0] == 12
    from n2nsurgery.verify import verify

    assert verify(model, student).passed
