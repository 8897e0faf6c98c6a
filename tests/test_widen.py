"""Net2WiderNet through the CLI, checked against ordinary torch.nn modules.

Each test builds the teacher as a plain ``torch.nn`` module, widens its checkpoint with
``n2n widen``, loads the student's tensors into the same module class built with the wider
widths, and compares outputs in eval mode by max |Δ| relative to max |y| (≤ 1e-5 for float32).
"""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from n2nsurgery import examples
from n2nsurgery.cli import app

from conftest import max_abs_diff, n2n_exe

REL_TOL = 1e-5


# ------------------------------------------------------------------------------- harness


def write_teacher(tmp_path, module: nn.Module, yaml_text: str, name: str = "teacher", dtype=None):
    sd = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    ckpt, arch = tmp_path / f"{name}.safetensors", tmp_path / f"{name}.yaml"
    save_file(sd, str(ckpt), metadata={"format": "pt"})
    arch.write_text(yaml_text)
    return str(ckpt), str(arch)


def widen_cli(runner, ckpt, args, out, arch=None, expect=0):
    cmd = ["widen", ckpt] + (["--arch", arch] if arch else []) + list(args) + ["-o", str(out)]
    result = runner.invoke(app, cmd)
    assert result.exit_code == expect, result.output
    return result


def rel_error(teacher: nn.Module, student: nn.Module, x: torch.Tensor) -> float:
    teacher.eval(), student.eval()
    with torch.no_grad():
        want, got = teacher(x), student(x)
    return max_abs_diff(got, want) / float(want.abs().max())


def load_student(module: nn.Module, path) -> nn.Module:
    module.load_state_dict(load_file(str(path)))
    return module.eval()


# ---------------------------------------------------------------------------- patterns


@pytest.mark.parametrize("layer,widths", [("fc1", {"h1": 48}), ("fc2", {"h2": 33})])
@pytest.mark.parametrize("split", ["equal", "random"])
def test_mlp(runner, tmp_path, layer, widths, split):
    teacher = examples.build("mlp")
    ckpt, arch = write_teacher(tmp_path, teacher, examples.MLP_YAML)
    width = next(iter(widths.values()))
    widen_cli(runner, ckpt, ["--layer", layer, "--width", str(width), "--split", split], tmp_path / "s.safetensors", arch)
    student = load_student(examples.MLP(**widths), tmp_path / "s.safetensors")
    assert rel_error(teacher, student, torch.randn(64, 16)) <= REL_TOL


@pytest.mark.parametrize("layer,widths", [("conv1", {"c1": 13}), ("conv2", {"c2": 20})])
def test_conv_batchnorm_and_nonsquare_flatten(runner, tmp_path, layer, widths):
    teacher = examples.build("cnn")  # batchnorm with trained-looking statistics; flatten of 4×3
    ckpt, arch = write_teacher(tmp_path, teacher, examples.CNN_YAML)
    widen_cli(runner, ckpt, ["--layer", layer, "--width", str(next(iter(widths.values())))], tmp_path / "s.safetensors", arch)
    student = load_student(examples.CNN(**widths), tmp_path / "s.safetensors")
    assert rel_error(teacher, student, torch.randn(32, 3, 8, 6)) <= REL_TOL


@pytest.mark.parametrize(
    "layer,widths",
    [
        ("stem", {"c": 13}),  # identity skip: pulls in b1_conv2 (and its batchnorm)
        ("b1_conv2", {"c": 11}),  # the same group, entered from the branch side
        ("b1_conv1", {"mid": 14}),
        ("b2_conv1", {"mid2": 19}),
        ("b2_conv2", {"c2": 17, "mid2": 12}),  # projection skip: pulls in b2_proj
        ("b2_proj", {"c2": 15, "mid2": 12}),
    ],
)
def test_residual_identity_and_projection_skips(runner, tmp_path, layer, widths):
    teacher = examples.build("resnet")
    ckpt, arch = write_teacher(tmp_path, teacher, examples.RESNET_YAML)
    widen_cli(runner, ckpt, ["--layer", layer, "--width", str(next(iter(widths.values()))), "--split", "random"], tmp_path / "s.safetensors", arch)
    student = load_student(examples.ResNet(**widths), tmp_path / "s.safetensors")
    assert rel_error(teacher, student, torch.randn(32, 3, 8, 8)) <= REL_TOL


@pytest.mark.parametrize("layer,widths", [("stem", {"stem": 12}), ("b1", {"b1": 7}), ("b2a", {"b2a": 9}), ("b2", {"b2": 10}), ("b3", {"b3": 5})])
def test_inception_concat_segments(runner, tmp_path, layer, widths):
    teacher = examples.build("inception")
    ckpt, arch = write_teacher(tmp_path, teacher, examples.INCEPTION_YAML)
    widen_cli(runner, ckpt, ["--layer", layer, "--width", str(next(iter(widths.values())))], tmp_path / "s.safetensors", arch)
    student = load_student(examples.Inception(**widths), tmp_path / "s.safetensors")
    assert rel_error(teacher, student, torch.randn(32, 3, 8, 8)) <= REL_TOL


class NestedCat(nn.Module):
    """cat([cat([a, b]), a]): a nested concat that holds `a` twice, then a 1×1 conv and a
    flatten of a non-square 5×3 map into a linear layer."""

    def __init__(self, a=4, b=3):
        super().__init__()
        self.a = nn.Conv2d(2, a, 3, padding=1)
        self.b = nn.Conv2d(2, b, 3, padding=1)
        self.mix = nn.Conv2d(2 * a + b, 6, 1)
        self.head = nn.Linear(2 * a + b, 5)
        self.fc = nn.Linear(6 * 5 * 3, 4)

    def forward(self, x):
        a, b = torch.relu(self.a(x)), torch.tanh(self.b(x))
        inner = torch.cat([a, b], 1)
        outer = torch.cat([inner, a], 1)
        y = self.fc(torch.flatten(torch.relu(self.mix(outer)), 1))
        z = self.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(outer, 1), 1))
        return torch.cat([y, z], 1)


NESTED_YAML = """\
format: n2n-arch/1
inputs:
  x: {shape: [2, 5, 3]}
nodes:
  - {name: a, op: conv2d, in: x, padding: 1}
  - {name: a_relu, op: relu, in: a}
  - {name: b, op: conv2d, in: x, padding: 1}
  - {name: b_tanh, op: tanh, in: b}
  - {name: inner, op: concat, in: [a_relu, b_tanh]}
  - {name: outer, op: concat, in: [inner, a_relu]}
  - {name: mix, op: conv2d, in: outer}
  - {name: mix_relu, op: relu, in: mix}
  - {name: flat, op: flatten, in: mix_relu}
  - {name: fc, op: linear, in: flat}
  - {name: gap, op: adaptive_avg_pool2d, in: outer, output_size: 1}
  - {name: gap_flat, op: flatten, in: gap}
  - {name: head, op: linear, in: gap_flat}
  - {name: out, op: concat, in: [fc, head]}
outputs: [out]
"""


@pytest.mark.parametrize("layer,widths", [("a", {"a": 7}), ("b", {"b": 8})])
def test_nested_concat_with_repeated_input(runner, tmp_path, layer, widths):
    torch.manual_seed(1)
    teacher = NestedCat().eval()
    ckpt, arch = write_teacher(tmp_path, teacher, NESTED_YAML)
    widen_cli(runner, ckpt, ["--layer", layer, "--width", str(next(iter(widths.values()))), "--split", "random"], tmp_path / "s.safetensors", arch)
    student = load_student(NestedCat(**widths), tmp_path / "s.safetensors")
    assert rel_error(teacher, student, torch.randn(32, 2, 5, 3)) <= REL_TOL


class Depthwise(nn.Module):
    """conv → bn → relu → depthwise 3×3 (channel multiplier `mult`) → bn → relu → 1×1 → pool → fc."""

    def __init__(self, c=6, mult=1, out=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c * mult, 3, padding=1, groups=c)
        self.bn2 = nn.BatchNorm2d(c * mult)
        self.pw = nn.Conv2d(c * mult, out, 1)
        self.fc = nn.Linear(out, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        x = torch.relu(self.pw(x)).mean((2, 3))
        return self.fc(x)


def depthwise_yaml(c, mult):
    return f"""\
format: n2n-arch/1
inputs:
  x: {{shape: [3, 7, 5]}}
nodes:
  - {{name: conv1, op: conv2d, in: x, padding: 1}}
  - {{name: bn1, op: batchnorm, in: conv1}}
  - {{name: relu1, op: relu, in: bn1}}
  - {{name: dw, op: conv2d, in: relu1, padding: 1, groups: {c}}}
  - {{name: bn2, op: batchnorm, in: dw}}
  - {{name: relu2, op: relu, in: bn2}}
  - {{name: pw, op: conv2d, in: relu2}}
  - {{name: relu3, op: relu, in: pw}}
  - {{name: pool, op: adaptive_avg_pool2d, in: relu3, output_size: 1}}
  - {{name: flat, op: flatten, in: pool}}
  - {{name: fc, op: linear, in: flat}}
outputs: [fc]
"""


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_conv_follows_its_input(runner, tmp_path, mult):
    torch.manual_seed(2)
    teacher = examples.randomize_batchnorm(Depthwise(6, mult)).eval()
    ckpt, arch = write_teacher(tmp_path, teacher, depthwise_yaml(6, mult))
    widen_cli(runner, ckpt, ["--layer", "conv1", "--width", "10"], tmp_path / "s.safetensors", arch)
    student = load_student(Depthwise(10, mult), tmp_path / "s.safetensors")
    assert rel_error(teacher, student, torch.randn(32, 3, 7, 5)) <= REL_TOL
    # the architecture travelled in the checkpoint with the depthwise conv's groups grown
    from n2nsurgery import load_model

    assert load_model(str(tmp_path / "s.safetensors")).arch.node("dw").resolved_attrs()["groups"] == 10


class ConvNd(nn.Module):
    """conv → bn → relu → conv → relu → flatten → linear, in 1-D or 3-D."""

    def __init__(self, nd, c1=4, c2=5):
        super().__init__()
        conv = {1: nn.Conv1d, 3: nn.Conv3d}[nd]
        bn = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}[nd]
        self.spatial = {1: (7,), 3: (3, 4, 2)}[nd]
        self.conv1 = conv(2, c1, 3, padding=1)
        self.bn1 = bn(c1)
        self.conv2 = conv(c1, c2, 1)
        self.fc = nn.Linear(c2 * int(torch.tensor(self.spatial).prod()), 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(torch.relu(self.conv2(x)), 1))


def convnd_yaml(nd):
    spatial = {1: [7], 3: [3, 4, 2]}[nd]
    return f"""\
format: n2n-arch/1
inputs:
  x: {{shape: {[2] + spatial}}}
nodes:
  - {{name: conv1, op: conv{nd}d, in: x, padding: 1}}
  - {{name: bn1, op: batchnorm, in: conv1}}
  - {{name: relu1, op: relu, in: bn1}}
  - {{name: conv2, op: conv{nd}d, in: relu1}}
  - {{name: relu2, op: relu, in: conv2}}
  - {{name: flat, op: flatten, in: relu2}}
  - {{name: fc, op: linear, in: flat}}
outputs: [fc]
"""


@pytest.mark.parametrize("nd", [1, 3])
@pytest.mark.parametrize("layer,widths", [("conv1", {"c1": 9}), ("conv2", {"c2": 8})])
def test_conv1d_and_conv3d_nets(runner, tmp_path, nd, layer, widths):
    torch.manual_seed(3)
    teacher = examples.randomize_batchnorm(ConvNd(nd)).eval()
    ckpt, arch = write_teacher(tmp_path, teacher, convnd_yaml(nd))
    widen_cli(runner, ckpt, ["--layer", layer, "--width", str(next(iter(widths.values())))], tmp_path / "s.safetensors", arch)
    student = load_student(ConvNd(nd, **widths), tmp_path / "s.safetensors")
    assert rel_error(teacher, student, torch.randn(32, 2, *teacher.spatial)) <= REL_TOL


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_checkpoints_keep_their_dtype(runner, tmp_path, dtype, tol):
    teacher = examples.build("cnn")
    ckpt, arch = write_teacher(tmp_path, teacher, examples.CNN_YAML, dtype=dtype)
    widen_cli(runner, ckpt, ["--layer", "conv2", "--width", "13"], tmp_path / "s.safetensors", arch)
    sd = load_file(str(tmp_path / "s.safetensors"))
    assert {v.dtype for k, v in sd.items() if v.is_floating_point()} == {dtype}
    # Both sides in float32 from the half-precision tensors: only the widening's rounding differs.
    teacher32 = examples.CNN()
    teacher32.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(ckpt).items()})
    student32 = examples.CNN(c2=13)
    student32.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    assert rel_error(teacher32, student32, torch.randn(32, 3, 8, 6)) <= tol


def test_chained_widening_of_every_layer(runner, tmp_path):
    """Widen every producer of the residual net in turn; the last student loads into the wide module."""
    teacher = examples.build("resnet")
    ckpt, arch = write_teacher(tmp_path, teacher, examples.RESNET_YAML)
    steps = [("stem", 10), ("b1_conv1", 11), ("b2_conv1", 13), ("b2_conv2", 16), ("b1_conv2", 12), ("b2_proj", 18)]
    src = ckpt
    for i, (layer, width) in enumerate(steps):
        out = tmp_path / f"s{i}.safetensors"
        widen_cli(runner, src, ["--layer", layer, "--width", str(width), "--seed", str(i)], out, arch if i == 0 else None)
        src = str(out)
    student = load_student(examples.ResNet(c=12, c2=18, mid=11, mid2=13), src)
    assert rel_error(teacher, student, torch.randn(32, 3, 8, 8)) <= REL_TOL


def test_random_split_gives_replicas_different_outgoing_weights(runner, tmp_path):
    teacher = examples.build("mlp")
    ckpt, arch = write_teacher(tmp_path, teacher, examples.MLP_YAML)
    widen_cli(runner, ckpt, ["--layer", "fc1", "--width", "64", "--split", "random"], tmp_path / "r.safetensors", arch)
    widen_cli(runner, ckpt, ["--layer", "fc1", "--width", "64"], tmp_path / "e.safetensors", arch)
    rnd, eq = load_file(str(tmp_path / "r.safetensors")), load_file(str(tmp_path / "e.safetensors"))
    # Same map (same seed), same incoming rows ...
    assert torch.equal(rnd["fc1.weight"], eq["fc1.weight"])
    rows = rnd["fc1.weight"]
    replicas = [(i, j) for i in range(32) for j in range(32, 64) if torch.equal(rows[i], rows[j])]
    assert replicas, "a 32 → 64 widening must replicate some unit"
    # ... but each replica pair carries a different part of the outgoing weight under --split random
    w = rnd["fc2.weight"]
    assert all(not torch.allclose(w[:, i], w[:, j]) for i, j in replicas)
    assert all(torch.allclose(eq["fc2.weight"][:, i], eq["fc2.weight"][:, j]) for i, j in replicas)
    student = load_student(examples.MLP(h1=64), tmp_path / "r.safetensors")
    assert rel_error(teacher, student, torch.randn(64, 16)) <= REL_TOL


def test_the_comparison_catches_a_wrong_remap(runner, tmp_path):
    """The checks above can fail: a student whose new batchnorm channel got default statistics
    (a bug seen in public code) is caught by the same comparison."""
    teacher = examples.build("cnn")
    ckpt, arch = write_teacher(tmp_path, teacher, examples.CNN_YAML)
    widen_cli(runner, ckpt, ["--layer", "conv1", "--width", "12"], tmp_path / "s.safetensors", arch)
    sd = load_file(str(tmp_path / "s.safetensors"))
    sd["bn1.running_mean"][10:] = 0.0
    sd["bn1.running_var"][10:] = 1.0
    student = examples.CNN(c1=12)
    student.load_state_dict(sd)
    assert rel_error(teacher, student, torch.randn(32, 3, 8, 6)) > 1e-3


# ------------------------------------------------------------------------------- noise


def test_noise_touches_new_replicas_only_and_reports_the_deviation(runner, tmp_path):
    teacher = examples.build("mlp")
    ckpt, arch = write_teacher(tmp_path, teacher, examples.MLP_YAML)
    result = widen_cli(runner, ckpt, ["--layer", "fc1", "--width", "40", "--noise", "0.05", "--json"], tmp_path / "n.safetensors", arch)
    import json

    report = json.loads(result.stdout)
    assert report["noise_deviation"]["max_abs"] > 0
    assert report["verification"]["passed"] is True  # the noise-free widening, verified strictly
    sd = load_file(str(tmp_path / "n.safetensors"))
    original = load_file(ckpt)
    assert torch.equal(sd["fc1.weight"][:32], original["fc1.weight"])  # teacher's units untouched
    assert torch.equal(sd["fc1.bias"][:32], original["fc1.bias"])
    widen_cli(runner, ckpt, ["--layer", "fc1", "--width", "40"], tmp_path / "e.safetensors", arch)
    exact = load_file(str(tmp_path / "e.safetensors"))
    assert not torch.equal(sd["fc1.weight"][32:], exact["fc1.weight"][32:])  # the replicas got noise


def test_noise_beyond_a_given_tolerance_fails_and_writes_nothing(runner, tmp_path):
    teacher = examples.build("mlp")
    ckpt, arch = write_teacher(tmp_path, teacher, examples.MLP_YAML)
    out = tmp_path / "n.safetensors"
    result = widen_cli(runner, ckpt, ["--layer", "fc1", "--width", "40", "--noise", "0.5", "--atol", "1e-6", "--rtol", "0"], out, arch, expect=1)
    assert "noise" in result.stderr and not out.exists()


# ------------------------------------------------------------------------ refusals (exit 2)

REFUSALS = [
    (["--layer", "fc9", "--width", "40"], "no node named 'fc9'", "did you mean"),
    (["--layer", "relu1", "--width", "40"], "is a relu", "widen its producer 'fc1'"),
    (["--layer", "fc1", "--width", "32"], "not larger than the current width", "give a width above 32"),
    (["--layer", "fc1", "--width", "8"], "narrowing cannot preserve the function", "give a width above 32"),
    (["--layer", "fc3", "--width", "12"], "reaches model output 'fc3'", "widen a layer whose units feed another layer"),
    (["--layer", "x", "--width", "20"], "'x' is a model input", "widen a linear or conv node"),
]


@pytest.mark.parametrize("args,reason,hint", REFUSALS)
def test_refusals_exit_2_with_reason_and_write_nothing(runner, tmp_path, args, reason, hint):
    ckpt, arch = write_teacher(tmp_path, examples.build("mlp"), examples.MLP_YAML)
    out = tmp_path / "s.safetensors"
    result = widen_cli(runner, ckpt, args, out, arch, expect=2)
    assert reason in result.stderr and hint in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1  # one message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.safetensors", "teacher.yaml"]


REFUSED_GRAPHS = {
    "grouped conv": (
        """\
format: n2n-arch/1
inputs:
  x: {shape: [2, 5, 5]}
nodes:
  - {name: c1, op: conv2d, in: x}
  - {name: g, op: conv2d, in: c1, groups: 2}
  - {name: pool, op: adaptive_avg_pool2d, in: g, output_size: 1}
  - {name: flat, op: flatten, in: pool}
  - {name: fc, op: linear, in: flat}
outputs: [fc]
""",
        {"c1.weight": (4, 2, 1, 1), "g.weight": (4, 2, 1, 1), "fc.weight": (3, 4)},
        "c1",
        "grouped convolution",
    ),
    "input residual": (
        """\
format: n2n-arch/1
inputs:
  x: {shape: [6]}
nodes:
  - {name: fc, op: linear, in: x}
  - {name: res, op: add, in: [x, fc]}
  - {name: head, op: linear, in: res}
outputs: [head]
""",
        {"fc.weight": (6, 6), "head.weight": (2, 6)},
        "fc",
        "coupled to model input 'x'",
    ),
    "concat from the consumer side": (
        """\
format: n2n-arch/1
inputs:
  x: {shape: [4]}
nodes:
  - {name: a, op: linear, in: x}
  - {name: b, op: linear, in: x}
  - {name: cat, op: concat, in: [a, b]}
  - {name: c, op: linear, in: x}
  - {name: s, op: add, in: [cat, c]}
  - {name: head, op: linear, in: s}
outputs: [head]
""",
        {"a.weight": (3, 4), "b.weight": (2, 4), "c.weight": (5, 4), "head.weight": (2, 5)},
        "c",
        "widen one of its inputs instead",
    ),
    "spatial axis": (
        """\
format: n2n-arch/1
inputs:
  x: {shape: [3, 4, 5]}
nodes:
  - {name: fcw, op: linear, in: x}
  - {name: conv, op: conv2d, in: fcw}
  - {name: flat, op: flatten, in: conv}
  - {name: head, op: linear, in: flat}
outputs: [head]
""",
        {"fcw.weight": (5, 5), "conv.weight": (2, 3, 1, 1), "head.weight": (2, 40)},
        "fcw",
        "spatial axis",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_GRAPHS))
def test_couplings_that_cannot_be_exact_are_refused(runner, tmp_path, case):
    yaml_text, shapes, layer, reason = REFUSED_GRAPHS[case]
    sd = {k: torch.randn(s) for k, s in shapes.items()}
    ckpt, arch = tmp_path / "t.safetensors", tmp_path / "t.yaml"
    save_file(sd, str(ckpt), metadata={"format": "pt"})
    arch.write_text(yaml_text)
    out = tmp_path / "s.safetensors"
    width = shapes[f"{layer}.weight"][0] + 3
    result = widen_cli(runner, str(ckpt), ["--layer", layer, "--width", str(width)], out, str(arch), expect=2)
    assert reason in result.stderr, result.stderr
    assert not out.exists()


def test_failed_verification_exits_1_and_writes_nothing(runner, tmp_path, monkeypatch):
    """If a remap were ever wrong, verification stops it: nothing is written."""
    import n2nsurgery.remap as remap_mod

    real = remap_mod._apply
    monkeypatch.setattr(remap_mod, "_apply", lambda *args: real(*args) * 1.01)
    ckpt, arch = write_teacher(tmp_path, examples.build("mlp"), examples.MLP_YAML)
    out = tmp_path / "s.safetensors"
    result = widen_cli(runner, ckpt, ["--layer", "fc1", "--width", "40"], out, arch, expect=1)
    assert "not function-preserving" in result.stderr and not out.exists()


# ------------------------------------------------------------------- determinism, report


def test_same_seed_same_bytes_across_processes(tmp_path):
    ckpt, arch = write_teacher(tmp_path, examples.build("resnet"), examples.RESNET_YAML)
    digests = []
    for i in range(2):
        out = tmp_path / f"s{i}.safetensors"
        subprocess.run([n2n_exe(), "widen", ckpt, "--arch", arch, "--layer", "stem", "--width", "13", "--split", "random", "--seed", "7", "-o", str(out)],
                       check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": str(i)})
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_different_seeds_draw_different_maps(runner, tmp_path):
    ckpt, arch = write_teacher(tmp_path, examples.build("mlp"), examples.MLP_YAML)
    widen_cli(runner, ckpt, ["--layer", "fc1", "--width", "64", "--seed", "1"], tmp_path / "a.safetensors", arch)
    widen_cli(runner, ckpt, ["--layer", "fc1", "--width", "64", "--seed", "2"], tmp_path / "b.safetensors", arch)
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert not torch.equal(a["fc1.weight"], b["fc1.weight"])


def test_json_report_lists_every_changed_tensor_and_the_group(runner, tmp_path):
    import json

    ckpt, arch = write_teacher(tmp_path, examples.build("resnet"), examples.RESNET_YAML)
    result = widen_cli(runner, ckpt, ["--layer", "b2_conv2", "--width", "16", "--json"], tmp_path / "s.safetensors", arch)
    report = json.loads(result.stdout)
    assert report["group"] == ["b2_conv2", "b2_proj"]
    changed = {c["key"]: (c["old_shape"], c["new_shape"]) for c in report["changes"]}
    assert changed["b2_proj.weight"] == ([12, 8, 1, 1], [16, 8, 1, 1])
    assert changed["b2_bn2.running_var"] == ([12], [16])
    assert changed["fc.weight"] == ([10, 12], [10, 16])
    before, after = load_file(ckpt), load_file(str(tmp_path / "s.safetensors"))
    really_changed = {k for k in before if before[k].shape != after[k].shape or not torch.equal(before[k], after[k])}
    assert really_changed == set(changed)
    assert report["verification"]["passed"] is True


def test_history_records_the_step(runner, tmp_path):
    from n2nsurgery import load_model

    ckpt, arch = write_teacher(tmp_path, examples.build("mlp"), examples.MLP_YAML)
    widen_cli(runner, ckpt, ["--layer", "fc1", "--width", "40", "--seed", "5"], tmp_path / "s.safetensors", arch)
    (step,) = load_model(str(tmp_path / "s.safetensors")).history
    assert step["op"] == "widen" and step["seed"] == 5
    assert step["args"] == {"layer": "fc1", "width": 40, "split": "equal", "noise": 0.0}
    assert step["verification"]["passed"] is True
