"""n2n deepen (Net2DeeperNet), through the CLI, checked against ordinary torch.nn modules.

Every teacher here is a plain ``nn.Sequential``; the student checkpoint the CLI writes must load
*strictly* into the same Sequential with the new layers inserted (so the new tensors have the
names and shapes torch expects), and that torch module must compute the teacher's outputs in
eval mode (max |Δ|). The shipped examples (graphs with skips and concats) are compared against
their torch.nn teachers too, with the student run by our executor.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections import OrderedDict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import n2nsurgery as n2n
from conftest import assert_close, example_paths, max_abs_diff, n2n_exe
from n2nsurgery import examples
from n2nsurgery.cli import app
from n2nsurgery.deepen import deepen, value_ranges
from n2nsurgery.executor import run

TOL = 1e-5  # float32 rounding: identity layers are exact, a Winograd conv may round differently


# --------------------------------------------------------------------------------- helpers


class Residual(nn.Sequential):
    """x + body(x): the torch.nn twin of a residual branch (its state_dict keys are NAME.fc1...)."""

    def forward(self, x):
        return x + super().forward(x)


def _seq(*layers) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


_YAML_OP = {
    nn.Linear: "linear",
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Conv3d: "conv3d",
    nn.BatchNorm1d: "batchnorm",
    nn.BatchNorm2d: "batchnorm",
    nn.BatchNorm3d: "batchnorm",
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.LeakyReLU: "leaky_relu",
    nn.Flatten: "flatten",
}


def _yaml_for(seq: nn.Sequential, in_shape) -> str:
    """The architecture of a plain Sequential of the layers above (padding read off the module)."""
    lines = ["format: n2n-arch/1", "inputs:", f"  x: {{shape: {list(in_shape)}, dtype: float32}}", "nodes:"]
    prev = "x"
    for name, m in seq.named_children():
        extra = ""
        if isinstance(m, nn.modules.conv._ConvNd) and m.padding[0]:
            extra = f", padding: {m.padding[0]}"
        if isinstance(m, nn.LeakyReLU):
            extra = f", negative_slope: {m.negative_slope}"
        lines.append(f"  - {{name: {name}, op: {_YAML_OP[type(m)]}, in: {prev}{extra}}}")
        prev = name
    lines.append(f"outputs: [{prev}]")
    return "\n".join(lines) + "\n"


def _save_teacher(tmp_path, seq: nn.Sequential, in_shape, dtype=None) -> tuple[str, str]:
    """Write a Sequential as a plain state_dict checkpoint (as a user would have) and its YAML."""
    state = {k: v.detach().clone().contiguous() for k, v in seq.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    ckpt, arch = tmp_path / "teacher.safetensors", tmp_path / "teacher.yaml"
    save_file(state, str(ckpt), metadata={"format": "pt"})
    arch.write_text(_yaml_for(seq, in_shape))
    return str(ckpt), str(arch)


def _insert(seq: nn.Sequential, after: str, new: list) -> nn.Sequential:
    """A copy of `seq` with (name, module) pairs inserted after child `after`."""
    layers = []
    for name, m in seq.named_children():
        layers.append((name, m))
        if name == after:
            layers.extend(new)
    return _seq(*layers)


def _student_module(path: str, seq: nn.Sequential, after: str, new: list) -> nn.Sequential:
    """`seq` with the new layers inserted, loaded STRICTLY from the student checkpoint, in eval mode."""
    student = _insert(seq, after, new)
    student.load_state_dict(load_file(path), strict=True)
    return student.eval()


def _metadata(path: str) -> dict:
    with safe_open(path, "pt") as f:
        return f.metadata()


def _arch_nodes(path: str) -> list:
    return n2n.parse_architecture(_metadata(path)["n2n.arch"]).nodes


def _deepen(runner, ckpt, out, *args, arch=None):
    cmd = ["deepen", ckpt, "-o", str(out), *args]
    if arch is not None:
        cmd += ["--arch", arch]
    return runner.invoke(app, cmd)


def _ok(result):
    assert result.exit_code == 0, result.stderr + result.stdout
    return result


@torch.no_grad()
def _assert_same_function(teacher: nn.Module, student: nn.Module, in_shape, tol=TOL, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((64, *in_shape), generator=g)
    d = max_abs_diff(student.eval()(x), teacher.eval()(x))
    assert d <= tol, f"max |Δ| = {d:.3g}"


def _mlp(seed=0, act=nn.ReLU) -> nn.Sequential:
    torch.manual_seed(seed)
    return _seq(("fc1", nn.Linear(12, 20)), ("relu1", act()), ("fc2", nn.Linear(20, 16)), ("relu2", act()), ("fc3", nn.Linear(16, 5))).eval()


def _cnn(nd: int = 2, batchnorm: bool = True, seed=0) -> nn.Sequential:
    """conv → [bn] → relu → conv → [bn] → relu → flatten → linear, in 1, 2 or 3 spatial dims."""
    torch.manual_seed(seed)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[nd]
    layers = [("conv1", conv(3, 6, 3, padding=1))]
    layers += [("bn1", bn(6))] if batchnorm else []
    layers += [("relu1", nn.ReLU()), ("conv2", conv(6, 5, 3, padding=1))]
    layers += [("bn2", bn(5))] if batchnorm else []
    layers += [("relu2", nn.ReLU()), ("flat", nn.Flatten()), ("fc", nn.Linear(5 * 4**nd, 7))]
    return examples.randomize_batchnorm(_seq(*layers), seed).eval()


def _cnn_shape(nd: int) -> tuple:
    return (3,) + (4,) * nd


# ------------------------------------------------------------------------ identity layers


def test_linear_after_relu_is_exact_and_loads_into_torch(runner, tmp_path):
    teacher = _mlp()
    ckpt, arch = _save_teacher(tmp_path, teacher, (12,))
    out = tmp_path / "s.safetensors"
    r = _ok(_deepen(runner, ckpt, out, "--after", "relu1", arch=arch))
    assert "wrote" in r.stderr and "pass" in r.stderr

    tensors = load_file(str(out))
    assert torch.equal(tensors["relu1_deep.weight"], torch.eye(20))
    assert torch.equal(tensors["relu1_deep.bias"], torch.zeros(20))
    student = _student_module(str(out), teacher, "relu1", [("relu1_deep", nn.Linear(20, 20)), ("relu1_deep_relu", nn.ReLU())])
    _assert_same_function(teacher, student, (12,))

    nodes = {n.name: n for n in _arch_nodes(str(out))}
    assert (nodes["relu1_deep"].op, nodes["relu1_deep"].inputs) == ("linear", ["relu1"])
    assert (nodes["relu1_deep_relu"].op, nodes["relu1_deep_relu"].inputs) == ("relu", ["relu1_deep"])
    assert nodes["fc2"].inputs == ["relu1_deep_relu"]
    # The teacher's tensors are carried over unchanged.
    for k, v in teacher.state_dict().items():
        assert torch.equal(tensors[k], v), k


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_conv2d_identity_kernel_sizes(runner, tmp_path, k, batchnorm):
    teacher = _cnn(2, batchnorm=True)  # trained-looking statistics in the teacher's own batchnorms
    ckpt, arch = _save_teacher(tmp_path, teacher, _cnn_shape(2))
    out = tmp_path / "s.safetensors"
    args = ["--after", "relu1", "--op", "conv", "--kernel-size", str(k)] + (["--batchnorm"] if batchnorm else [])
    _ok(_deepen(runner, ckpt, out, *args, arch=arch))

    w = load_file(str(out))["relu1_deep.weight"]
    assert w.shape == (6, 6, k, k)
    # A centred delta: 1 at [c, c, k//2, k//2], 0 everywhere else.
    expected = torch.zeros(6, 6, k, k)
    for c in range(6):
        expected[c, c, k // 2, k // 2] = 1
    assert torch.equal(w, expected)
    new = [("relu1_deep", nn.Conv2d(6, 6, k, padding=k // 2))]
    new += [("relu1_deep_bn", nn.BatchNorm2d(6))] if batchnorm else []
    new += [("relu1_deep_relu", nn.ReLU())]
    student = _student_module(str(out), teacher, "relu1", new)
    _assert_same_function(teacher, student, _cnn_shape(2))


@pytest.mark.parametrize("nd", [1, 3])
def test_conv1d_and_conv3d_picked_by_rank(runner, tmp_path, nd):
    teacher = _cnn(nd, batchnorm=True)
    ckpt, arch = _save_teacher(tmp_path, teacher, _cnn_shape(nd))
    out = tmp_path / "s.safetensors"
    r = _ok(_deepen(runner, ckpt, out, "--after", "relu2", "--batchnorm", "--json", arch=arch))
    assert json.loads(r.stdout)["op"] == f"conv{nd}d"  # --op auto picks the conv of the value's rank
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[nd]
    bn = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}[nd]
    new = [("relu2_deep", conv(5, 5, 3, padding=1)), ("relu2_deep_bn", bn(5)), ("relu2_deep_relu", nn.ReLU())]
    student = _student_module(str(out), teacher, "relu2", new)
    _assert_same_function(teacher, student, _cnn_shape(nd))


def test_identity_batchnorm_is_exactly_the_identity_at_inference(runner, tmp_path):
    teacher = _cnn(2)
    ckpt, arch = _save_teacher(tmp_path, teacher, _cnn_shape(2))
    out = tmp_path / "s.safetensors"
    _ok(_deepen(runner, ckpt, out, "--after", "relu1", "--batchnorm", "--activation", "none", arch=arch))
    t = load_file(str(out))
    bn = nn.BatchNorm2d(6).eval()
    bn.load_state_dict({k.removeprefix("relu1_deep_bn."): v for k, v in t.items() if k.startswith("relu1_deep_bn.")})
    x = torch.randn(16, 6, 5, 5) * 10
    with torch.no_grad():
        assert torch.equal(bn(x), x)  # not merely close: var + eps is exactly 1 in float32
    assert [n.name for n in _arch_nodes(str(out))][3:5] == ["relu1_deep", "relu1_deep_bn"]


def test_linear_on_a_spatial_value_acts_on_the_last_axis(runner, tmp_path):
    """--op linear on [C, L] is exact (identity over the last axis), though auto never picks it."""
    teacher = _cnn(1, batchnorm=False)
    ckpt, arch = _save_teacher(tmp_path, teacher, _cnn_shape(1))
    out = tmp_path / "s.safetensors"
    _ok(_deepen(runner, ckpt, out, "--after", "relu1", "--op", "linear", arch=arch))
    student = _student_module(str(out), teacher, "relu1", [("relu1_deep", nn.Linear(4, 4)), ("relu1_deep_relu", nn.ReLU())])
    _assert_same_function(teacher, student, _cnn_shape(1))


def test_relu6_after_relu6_is_exact(runner, tmp_path):
    teacher = _mlp(act=nn.ReLU6)
    ckpt, arch = _save_teacher(tmp_path, teacher, (12,))
    out = tmp_path / "s.safetensors"
    _ok(_deepen(runner, ckpt, out, "--after", "relu2", arch=arch))
    student = _student_module(str(out), teacher, "relu2", [("relu2_deep", nn.Linear(16, 16)), ("relu2_deep_relu6", nn.ReLU6())])
    _assert_same_function(teacher, student, (12,))


def test_deepen_after_a_model_output_moves_the_output(runner, tmp_path):
    teacher = _mlp()
    ckpt, arch = _save_teacher(tmp_path, teacher, (12,))
    out = tmp_path / "s.safetensors"
    r = _ok(_deepen(runner, ckpt, out, "--after", "fc3", "--json", arch=arch))
    assert json.loads(r.stdout)["outputs"] == [{"from": "fc3", "to": "fc3_deep"}]
    assert n2n.parse_architecture(_metadata(str(out))["n2n.arch"]).outputs == ["fc3_deep"]
    student = _student_module(str(out), teacher, "fc3", [("fc3_deep", nn.Linear(5, 5))])
    _assert_same_function(teacher, student, (12,))


def test_deepen_after_a_model_input(runner, tmp_path):
    teacher = _mlp()
    ckpt, arch = _save_teacher(tmp_path, teacher, (12,))
    out = tmp_path / "s.safetensors"
    _ok(_deepen(runner, ckpt, out, "--after", "x", arch=arch))
    assert [n.name for n in _arch_nodes(str(out))][:2] == ["x_deep", "fc1"]
    student = _seq(("x_deep", nn.Linear(12, 12)), *teacher.named_children())
    student.load_state_dict(load_file(str(out)), strict=True)
    _assert_same_function(teacher, student, (12,))


# ------------------------------------------------------------------------ residual branches


def test_residual_after_a_signed_linear(runner, tmp_path):
    teacher = _mlp()
    ckpt, arch = _save_teacher(tmp_path, teacher, (12,))
    out = tmp_path / "s.safetensors"
    _ok(_deepen(runner, ckpt, out, "--after", "fc1", "--op", "residual", "--hidden", "9", "--seed", "3", arch=arch))
    t = load_file(str(out))
    assert torch.equal(t["fc1_deep.fc2.weight"], torch.zeros(20, 9))
    assert torch.equal(t["fc1_deep.fc2.bias"], torch.zeros(20))
    # W1: torch.nn.Linear's default init, U(±1/sqrt(fan_in)), drawn from the seed (not all zero).
    w1 = t["fc1_deep.fc1.weight"]
    assert w1.shape == (9, 20) and w1.abs().max() <= 1 / math.sqrt(20) and w1.abs().min() > 0
    body = Residual(OrderedDict(fc1=nn.Linear(20, 9), relu=nn.ReLU(), fc2=nn.Linear(9, 20)))
    student = _student_module(str(out), teacher, "fc1", [("fc1_deep", body)])
    _assert_same_function(teacher, student, (12,))
    nodes = {n.name: n for n in _arch_nodes(str(out))}
    assert nodes["fc1_deep"].op == "add" and nodes["fc1_deep"].inputs == ["fc1", "fc1_deep.fc2"]
    assert nodes["relu1"].inputs == ["fc1_deep"]


def test_residual_conv_with_batchnorm_after_a_signed_conv(runner, tmp_path):
    teacher = _cnn(2)
    ckpt, arch = _save_teacher(tmp_path, teacher, _cnn_shape(2))
    out = tmp_path / "s.safetensors"
    _ok(_deepen(runner, ckpt, out, "--after", "conv2", "--op", "residual", "--batchnorm", "--activation", "gelu", arch=arch))
    body = Residual(OrderedDict(conv1=nn.Conv2d(5, 5, 3, padding=1), bn=nn.BatchNorm2d(5), gelu=nn.GELU(), conv2=nn.Conv2d(5, 5, 3, padding=1)))
    student = _student_module(str(out), teacher, "conv2", [("conv2_deep", body)])
    _assert_same_function(teacher, student, _cnn_shape(2))


def test_residual_after_tanh(runner, tmp_path):
    teacher = _mlp(act=nn.Tanh)
    ckpt, arch = _save_teacher(tmp_path, teacher, (12,))
    out = tmp_path / "s.safetensors"
    _ok(_deepen(runner, ckpt, out, "--after", "relu1", "--op", "residual", "--activation", "tanh", arch=arch))
    body = Residual(OrderedDict(fc1=nn.Linear(20, 20), tanh=nn.Tanh(), fc2=nn.Linear(20, 20)))
    student = _student_module(str(out), teacher, "relu1", [("relu1_deep", body)])
    _assert_same_function(teacher, student, (12,))


def test_residual_seed_changes_w1_only(tmp_path):
    teacher = n2n.model_from_state_dict(_yaml_for(_mlp(), (12,)), _mlp().state_dict())
    a, _ = deepen(teacher, "fc1", op="residual", seed=1)
    b, _ = deepen(teacher, "fc1", op="residual", seed=2)
    assert not torch.equal(a.tensors.get("fc1_deep.fc1.weight"), b.tensors.get("fc1_deep.fc1.weight"))
    assert torch.equal(a.tensors.get("fc1_deep.fc2.weight"), b.tensors.get("fc1_deep.fc2.weight"))


# --------------------------------------------------------------------- chains and widening


def test_deepen_twice_in_a_row_without_arch(runner, tmp_path):
    teacher = _cnn(2)
    ckpt, arch = _save_teacher(tmp_path, teacher, _cnn_shape(2))
    s1, s2 = tmp_path / "s1.safetensors", tmp_path / "s2.safetensors"
    _ok(_deepen(runner, ckpt, s1, "--after", "relu1", "--batchnorm", arch=arch))
    # The second run needs no --arch: the first student carries n2n.arch.
    _ok(_deepen(runner, str(s1), s2, "--after", "relu1_deep_relu", "--kernel-size", "5"))
    new = [
        ("relu1_deep", nn.Conv2d(6, 6, 3, padding=1)),
        ("relu1_deep_bn", nn.BatchNorm2d(6)),
        ("relu1_deep_relu", nn.ReLU()),
        ("relu1_deep2", nn.Conv2d(6, 6, 5, padding=2)),  # numbering continues, no _deep_relu_deep
        ("relu1_deep2_relu", nn.ReLU()),
    ]
    student = _student_module(str(s2), teacher, "relu1", new)
    _assert_same_function(teacher, student, _cnn_shape(2))
    history = json.loads(_metadata(str(s2))["n2n.history"])
    assert [h["op"] for h in history] == ["deepen", "deepen"]
    assert [h["args"]["after"] for h in history] == ["relu1", "relu1_deep_relu"]
    assert all(h["verification"]["passed"] for h in history)


def test_deepen_then_widen_the_new_layer(runner, tmp_path):
    teacher = _mlp()
    ckpt, arch = _save_teacher(tmp_path, teacher, (12,))
    s1, s2 = tmp_path / "s1.safetensors", tmp_path / "s2.safetensors"
    _ok(_deepen(runner, ckpt, s1, "--after", "relu1", arch=arch))
    _ok(runner.invoke(app, ["widen", str(s1), "--layer", "relu1_deep", "--width", "33", "-o", str(s2)]))
    student = _insert(teacher, "relu1", [("relu1_deep", nn.Linear(20, 33)), ("relu1_deep_relu", nn.ReLU())])
    student.fc2 = nn.Linear(33, 16)
    student.load_state_dict(load_file(str(s2)), strict=True)
    _assert_same_function(teacher, student, (12,))


def test_residual_hidden_layer_is_widenable(runner, tmp_path):
    teacher = _cnn(2)
    ckpt, arch = _save_teacher(tmp_path, teacher, _cnn_shape(2))
    s1, s2 = tmp_path / "s1.safetensors", tmp_path / "s2.safetensors"
    _ok(_deepen(runner, ckpt, s1, "--after", "relu2", "--op", "residual", "--batchnorm", "--hidden", "4", arch=arch))
    _ok(runner.invoke(app, ["widen", str(s1), "--layer", "relu2_deep.conv1", "--width", "7", "--split", "random", "-o", str(s2)]))
    body = Residual(OrderedDict(conv1=nn.Conv2d(5, 7, 3, padding=1), bn=nn.BatchNorm2d(7), relu=nn.ReLU(), conv2=nn.Conv2d(7, 5, 3, padding=1)))
    student = _student_module(str(s2), teacher, "relu2", [("relu2_deep", body)])
    _assert_same_function(teacher, student, _cnn_shape(2))


def test_stdin_to_stdout_chain(runner, tmp_path):
    teacher = _mlp()
    ckpt, arch = _save_teacher(tmp_path, teacher, (12,))
    r = _ok(runner.invoke(app, ["deepen", "-", "--arch", arch, "--after", "relu2", "-o", "-"], input=open(ckpt, "rb").read()))
    out = tmp_path / "s.safetensors"
    out.write_bytes(r.stdout_bytes)
    student = _student_module(str(out), teacher, "relu2", [("relu2_deep", nn.Linear(16, 16)), ("relu2_deep_relu", nn.ReLU())])
    _assert_same_function(teacher, student, (12,))


# --------------------------------------------------------------------- shipped example graphs


@pytest.mark.parametrize(
    "name, args, new_nodes",
    [
        ("resnet", ["--after", "b1_add"], ["b1_add_deep"]),  # a signed sum: conv, no activation
        ("resnet", ["--after", "b1_relu", "--batchnorm"], ["b1_relu_deep", "b1_relu_deep_bn", "b1_relu_deep_relu"]),
        ("resnet", ["--after", "stem_bn", "--op", "residual", "--batchnorm"], ["stem_bn_deep.conv1", "stem_bn_deep.bn", "stem_bn_deep.relu", "stem_bn_deep.conv2", "stem_bn_deep"]),
        # a concat and a max pool of relus are non-negative, so relu after them is exact
        ("inception", ["--after", "cat", "--activation", "relu"], ["cat_deep", "cat_deep_relu"]),
        ("inception", ["--after", "b3_pool", "--activation", "relu", "--kernel-size", "1"], ["b3_pool_deep", "b3_pool_deep_relu"]),
        ("cnn", ["--after", "pool1", "--activation", "relu6", "--op", "residual"], None),
        ("cnn", ["--after", "flat", "--activation", "relu"], ["flat_deep", "flat_deep_relu"]),  # linear on 1-D
    ],
)
def test_shipped_examples_against_their_torch_teachers(runner, tmp_path, name, args, new_nodes):
    ckpt, arch = example_paths(name)
    out = tmp_path / "s.safetensors"
    r = _ok(_deepen(runner, ckpt, out, *args, "--json", arch=arch))
    report = json.loads(r.stdout)
    if new_nodes is not None:
        assert [n["name"] for n in report["nodes"]] == new_nodes
    assert report["verification"]["passed"]
    teacher = examples.build(name)
    student = n2n.load_model(str(out))
    x = torch.randn((64, *student.arch.inputs["x"].shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = teacher(x)
    (got,) = run(student, {"x": x})
    assert_close(got, want, TOL)


def test_value_ranges_follow_the_graph():
    model = n2n.load_model(*example_paths("resnet"))
    r = value_ranges(model)
    assert r["x"].lo == -math.inf and r["stem"].lo == -math.inf
    assert r["stem_relu"].lo == 0 and r["pool"].lo == 0
    assert r["b1_add"].lo == -math.inf  # relu + a batchnorm output: signed


# ----------------------------------------------------------------------------- dtypes, json


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["conv", "residual"])
def test_dtype_is_kept(runner, tmp_path, dtype, op):
    teacher = _cnn(2)
    ckpt, arch = _save_teacher(tmp_path, teacher, _cnn_shape(2), dtype=dtype)
    out = tmp_path / "s.safetensors"
    _ok(_deepen(runner, ckpt, out, "--after", "relu1", "--op", op, "--batchnorm", arch=arch))
    t = load_file(str(out))
    new_keys = [k for k in t if k.startswith("relu1_deep")]
    assert new_keys and all(t[k].dtype == (torch.int64 if k.endswith("num_batches_tracked") else dtype) for k in new_keys)
    # Compare against the same-dtype teacher, both run in float32.
    low = _cnn(2)
    low.load_state_dict(load_file(ckpt))
    if op == "conv":
        new = [("relu1_deep", nn.Conv2d(6, 6, 3, padding=1)), ("relu1_deep_bn", nn.BatchNorm2d(6)), ("relu1_deep_relu", nn.ReLU())]
    else:
        new = [("relu1_deep", Residual(OrderedDict(conv1=nn.Conv2d(6, 6, 3, padding=1), bn=nn.BatchNorm2d(6), relu=nn.ReLU(), conv2=nn.Conv2d(6, 6, 3, padding=1))))]
    student = _student_module(str(out), low, "relu1", new)
    # bn's var rounds to 1 in 16-bit, so its scale is 1/sqrt(1 + 1e-5): within 1e-5 relative
    _assert_same_function(low, student, _cnn_shape(2), tol=1e-4)


def test_json_report(runner, tmp_path):
    teacher = _mlp()
    ckpt, arch = _save_teacher(tmp_path, teacher, (12,))
    out = tmp_path / "s.safetensors"
    r = _ok(_deepen(runner, ckpt, out, "--after", "relu2", "--batchnorm", "--name", "extra", "--json", arch=arch))
    rep = json.loads(r.stdout)
    assert rep["command"] == "deepen" and rep["after"] == "relu2" and rep["op"] == "linear"
    assert rep["layer"] == "extra" and rep["activation"] == "relu" and rep["value_range"] == "[0, inf]"
    assert [(n["name"], n["op"], n["in"]) for n in rep["nodes"]] == [
        ("extra", "linear", ["relu2"]),
        ("extra_bn", "batchnorm", ["extra"]),
        ("extra_relu", "relu", ["extra_bn"]),
    ]
    assert {t["key"]: t["shape"] for t in rep["tensors"]} == {
        "extra.weight": [16, 16],
        "extra.bias": [16],
        "extra_bn.weight": [16],
        "extra_bn.bias": [16],
        "extra_bn.running_mean": [16],
        "extra_bn.running_var": [16],
        "extra_bn.num_batches_tracked": [],
    }
    assert rep["rewired"] == ["fc3"] and rep["outputs"] == []
    assert rep["arch"]["nodes_before"] == 5 and rep["arch"]["nodes_after"] == 8
    assert rep["arch"]["parameters_after"] - rep["arch"]["parameters_before"] == 16 * 16 + 16 + 4 * 16  # num_batches_tracked is a counter, not a parameter
    assert rep["verification"]["passed"] and rep["output"] == str(out)
    step = json.loads(_metadata(str(out))["n2n.history"])[-1]
    assert step["op"] == "deepen" and step["args"]["name"] == "extra" and step["args"]["batchnorm"] is True


def test_no_verify_still_writes(runner, tmp_path):
    teacher = _mlp()
    ckpt, arch = _save_teacher(tmp_path, teacher, (12,))
    out = tmp_path / "s.safetensors"
    r = _ok(_deepen(runner, ckpt, out, "--after", "relu2", "--no-verify", arch=arch))
    assert "not verified" in r.stderr and out.exists()
    assert json.loads(_metadata(str(out))["n2n.history"])[-1]["verification"] is None


def test_same_seed_same_bytes_across_processes(runner, tmp_path):
    ckpt, arch = example_paths("cnn")
    args = ["deepen", ckpt, "--arch", arch, "--after", "relu2", "--op", "residual", "--batchnorm", "-o"]
    outs = []
    for i in range(2):
        out = tmp_path / f"s{i}.safetensors"
        cmd = [n2n_exe(), *args, str(out), "--seed", "7"]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": str(i)})
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    other = tmp_path / "other.safetensors"
    _ok(runner.invoke(app, [*args, str(other), "--seed", "8"]))
    assert other.read_bytes() != outs[0]  # the seed draws W1


# ---------------------------------------------------------------------------------- refusals


def _refused(result, out, *fragments):
    """Exit 2, one `error:` line holding every fragment, no traceback, nothing written."""
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert not out.exists()
    assert os.listdir(out.parent) == [n for n in os.listdir(out.parent) if not n.startswith(".")]  # no temp file


_MLP_REFUSALS = [
    (["--after", "relu9"], ["no node named 'relu9'", "did you mean", "relu1"]),
    (["--after", "fc1", "--activation", "relu"], ["not exact", "relu(v) = v only for v ≥ 0", "[-inf, inf]", "--op residual", "--activation none"]),
    (["--after", "relu1", "--activation", "relu6"], ["relu6(v) = v only for 0 ≤ v ≤ 6", "[0, inf]", "--op residual"]),
    (["--after", "relu1", "--activation", "sigmoid"], ["would change the function", "sigmoid(v) ≠ v", "--op residual", "--activation none"]),
    (["--after", "relu1", "--activation", "swish"], ["--activation must be one of", "'swish'"]),
    (["--after", "relu1", "--op", "conv"], ["--op conv needs a value [channels, 1 to 3 spatial axes]", "[20]", "--op linear"]),
    (["--after", "relu1", "--kernel-size", "5"], ["--kernel-size applies to convolutions", "linear"]),
    (["--after", "relu1", "--name", "fc2"], ["--name 'fc2'", "already has a node", "another --name"]),
    (["--after", "relu1", "--name", "x"], ["--name 'x'", "a model input"]),
    (["--after", "relu1", "--name", "relu2", "--activation", "none"], ["--name 'relu2'", "already has a node"]),
    (["--after", "relu1", "--hidden", "8"], ["--hidden", "--op residual"]),
    (["--after", "relu1", "--op", "residual", "--hidden", "0"], ["--hidden must be a positive integer", "0"]),
]


@pytest.mark.parametrize("args, fragments", _MLP_REFUSALS, ids=[" ".join(a) for a, _ in _MLP_REFUSALS])
def test_refusals_mlp(runner, tmp_path, args, fragments):
    ckpt, arch = _save_teacher(tmp_path, _mlp(), (12,))
    out = tmp_path / "out" / "s.safetensors"
    out.parent.mkdir()
    _refused(_deepen(runner, ckpt, out, *args, arch=arch), out, *fragments)


def test_refused_identity_tanh_by_default_after_tanh(runner, tmp_path):
    ckpt, arch = _save_teacher(tmp_path, _mlp(act=nn.Tanh), (12,))
    out = tmp_path / "out" / "s.safetensors"
    out.parent.mkdir()
    _refused(_deepen(runner, ckpt, out, "--after", "relu2", arch=arch), out, "tanh(v) ≠ v", "[-1, 1]", "--op residual")


def test_refused_leaky_relu_after_leaky_relu(runner, tmp_path):
    ckpt, arch = _save_teacher(tmp_path, _mlp(act=lambda: nn.LeakyReLU(0.2)), (12,))
    out = tmp_path / "out" / "s.safetensors"
    out.parent.mkdir()
    _refused(_deepen(runner, ckpt, out, "--after", "relu1", arch=arch), out, "leaky_relu(v) = v only for v ≥ 0", "--op residual")
    # ...and with --activation none the identity layer alone is exact.
    _ok(_deepen(runner, ckpt, out, "--after", "relu1", "--activation", "none", arch=arch))


@pytest.mark.parametrize("k", ["2", "4", "0"])
def test_refused_even_kernel(runner, tmp_path, k):
    ckpt, arch = example_paths("cnn")
    out = tmp_path / "s.safetensors"
    _refused(_deepen(runner, ckpt, out, "--after", "relu2", "--kernel-size", k, arch=arch), out, f"--kernel-size {k} has no centre", "odd size")


def test_refused_name_whose_tensor_key_exists(runner, tmp_path):
    """A tensor the checkpoint holds but no node uses still blocks the name."""
    teacher = _mlp()
    ckpt, arch = _save_teacher(tmp_path, teacher, (12,))
    state = load_file(ckpt)
    state["spare.weight"] = torch.zeros(3)
    save_file(state, ckpt, metadata={"format": "pt"})
    out = tmp_path / "out" / "s.safetensors"
    out.parent.mkdir()
    _refused(_deepen(runner, ckpt, out, "--after", "relu1", "--name", "spare", arch=arch), out, "'spare.weight'", "already has a tensor")


def _odd_inputs_arch(tmp_path) -> tuple[str, str]:
    """A model with an integer input and a 5-axis float input (neither has a deepen op by auto)."""
    yaml_text = """\
format: n2n-arch/1
inputs:
  x: {shape: [2, 2, 2, 2, 3], dtype: float32}
  ids: {shape: [4], dtype: int64, high: 10}
nodes:
  - {name: relu, op: relu, in: x}
  - {name: flat, op: flatten, in: relu}
  - {name: fc, op: linear, in: flat}
outputs: [fc]
"""
    torch.manual_seed(0)
    ckpt = tmp_path / "odd.safetensors"
    save_file({"fc.weight": torch.randn(3, 48), "fc.bias": torch.randn(3)}, str(ckpt), metadata={"format": "pt"})
    (tmp_path / "odd.yaml").write_text(yaml_text)
    return str(ckpt), str(tmp_path / "odd.yaml")


def test_refused_integer_input(runner, tmp_path):
    ckpt, arch = _odd_inputs_arch(tmp_path)
    out = tmp_path / "out" / "s.safetensors"
    out.parent.mkdir()
    _refused(_deepen(runner, ckpt, out, "--after", "ids", arch=arch), out, "input 'ids'", "int64", "no linear or conv")


def test_refused_rank_without_op_but_linear_works(runner, tmp_path):
    ckpt, arch = _odd_inputs_arch(tmp_path)
    out = tmp_path / "out" / "s.safetensors"
    out.parent.mkdir()
    _refused(_deepen(runner, ckpt, out, "--after", "relu", arch=arch), out, "[2, 2, 2, 2, 3]", "use --op linear")
    _refused(_deepen(runner, ckpt, out, "--after", "x", "--op", "conv", arch=arch), out, "--op conv needs", "--op linear")
    _refused(_deepen(runner, ckpt, out, "--after", "relu", "--op", "linear", "--batchnorm", arch=arch), out, "--batchnorm normalises the channel axis", "drop --batchnorm")
    # The alternative the message names is exact:
    _ok(_deepen(runner, ckpt, out, "--after", "relu", "--op", "linear", arch=arch))
    teacher, student = n2n.load_model(ckpt, arch), n2n.load_model(str(out))
    assert n2n.verify(teacher, student).max_abs == 0.0


def test_refused_json_to_stdout(runner, tmp_path):
    ckpt, arch = example_paths("mlp")
    r = runner.invoke(app, ["deepen", ckpt, "--arch", arch, "--after", "relu1", "-o", "-", "--json"])
    assert r.exit_code == 2 and "--json and -o -" in r.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("args", [["--after", "relu2", "--batchnorm", "--kernel-size", "5"], ["--after", "bn2", "--op", "residual", "--batchnorm"]])
def test_verified_on_cuda(runner, tmp_path, args):
    ckpt, arch = example_paths("cnn")
    out = tmp_path / "s.safetensors"
    r = _ok(_deepen(runner, ckpt, out, *args, "--device", "cuda", "--json", arch=arch))
    v = json.loads(r.stdout)["verification"]
    assert v["passed"] and v["device"].startswith("cuda")
    # The same tensors as a CPU run: verification never touches what is written.
    cpu = tmp_path / "cpu.safetensors"
    _ok(_deepen(runner, ckpt, cpu, *args, "--device", "cpu", arch=arch))
    a, b = load_file(str(out)), load_file(str(cpu))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
