"""One named test per bug the property and fuzz tests found (issue 6), so each stays fixed.

Each docstring says what went wrong before the fix. Exactness checks build the teacher and the
student as ordinary ``torch.nn`` modules and compare them in eval mode by max |Δ|.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import n2nsurgery as n2n
from conftest import example_paths, max_abs_diff
from n2nsurgery.cli import app
from n2nsurgery.errors import N2NError
from n2nsurgery.widen import widen

MLP_CKPT, MLP_ARCH = example_paths("mlp")


def _refused(result, *fragments) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _raw_checkpoint(path, header: dict, data: bytes) -> str:
    raw = json.dumps(header).encode("utf-8", "surrogatepass")
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


# ------------------------------------------------------------------------ widen through depthwise


class DepthwiseBranchPlusSkip(nn.Module):
    """fc(flatten(dw(a(x)) + b(x))): a depthwise conv on one operand of a residual add."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.a = nn.Conv2d(2, c, 1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.b = nn.Conv2d(2, c, 1)
        self.fc = nn.Linear(c * 36, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.dw(self.a(x)) + self.b(x), 1))


DEPTHWISE_YAML = """format: n2n-arch/1
inputs:
  x: {shape: [2, 6, 6], dtype: float32}
nodes:
  - {name: a, op: conv2d, in: x}
  - {name: dw, op: conv2d, in: a, padding: 1, groups: 4}
  - {name: b, op: conv2d, in: x}
  - {name: sum, op: add, in: [dw, b]}
  - {name: flat, op: flatten, in: sum}
  - {name: fc, op: linear, in: flat}
outputs: [fc]
"""


@pytest.mark.parametrize("layer", ["b", "a"])
def test_widen_reaching_a_depthwise_conv_from_its_output_side(layer):
    """Widening `b` pulls the add's other operand, the depthwise conv's OUTPUT, into the group.
    The depthwise rule then assigned its input's map but never remapped its own kernels or
    `groups` (the walk does not echo a value back to the rule that assigned it), so the student
    failed its own shape check and the request was refused with "groups=4 does not divide the 6
    input channels". Found by test_property_graphs."""
    torch.manual_seed(0)
    teacher = DepthwiseBranchPlusSkip(4).eval()
    model = n2n.model_from_state_dict(DEPTHWISE_YAML, teacher.state_dict())
    student_model, report = widen(model, layer, 6, split="random", seed=3)
    assert student_model.arch.node("dw").attrs["groups"] == 6
    student = DepthwiseBranchPlusSkip(6).eval()
    student.load_state_dict(student_model.tensors.to_dict())
    x = torch.randn(16, 2, 6, 6)
    with torch.no_grad():
        want, got = teacher(x), student(x)
    assert max_abs_diff(got, want) / float(want.abs().max()) <= 1e-5


class TiedBranches(nn.Module):
    """One linear layer applied to x and to tanh(x) (tied weights), each result with its own head."""

    def __init__(self, h: int = 5):
        super().__init__()
        self.a = nn.Linear(4, h)
        self.fa = nn.Linear(h, 3)
        self.fb = nn.Linear(h, 3)

    def forward(self, x):
        return self.fa(torch.relu(self.a(x))) + self.fb(torch.tanh(self.a(torch.tanh(x))))


TIED_YAML = """format: n2n-arch/1
inputs:
  x: {shape: [4], dtype: float32}
nodes:
  - {name: a, op: linear, in: x}
  - {name: ra, op: relu, in: a}
  - {name: tx, op: tanh, in: x}
  - {name: b, op: linear, in: tx, params: {weight: a.weight, bias: a.bias}}
  - {name: tb, op: tanh, in: b}
  - {name: fa, op: linear, in: ra}
  - {name: fb, op: linear, in: tb}
  - {name: out, op: add, in: [fa, fb]}
outputs: [out]
"""


@pytest.mark.parametrize("layer", ["a", "b"])
def test_widen_a_layer_whose_tensors_are_tied_to_another(layer):
    """`b` reads `a`'s tensors (params: in the YAML). Widening either remapped the shared tensor
    for one node only, so the other node's output grew without its consumer being remapped and
    the request was refused with an internal shape error ("expects 5 input features but the
    input has 7"). The tied layer produces the same units, so it now joins the group. Found by
    test_property_graphs once it generated tied layers."""
    torch.manual_seed(1)
    teacher = TiedBranches(5).eval()
    model = n2n.model_from_state_dict(TIED_YAML, teacher.state_dict())
    student_model, report = widen(model, layer, 7, split="random", seed=2)
    assert sorted(report.group) == ["a", "b"]  # the tied twin is named in the group
    student = TiedBranches(7).eval()
    student.load_state_dict(student_model.tensors.to_dict())
    x = torch.randn(32, 4)
    with torch.no_grad():
        want, got = teacher(x), student(x)
    assert max_abs_diff(got, want) / float(want.abs().max()) <= 1e-5


class TiedIntoConcat(nn.Module):
    """fc(cat([tanh(a(x)), a(relu(x))])): one linear layer, tied, feeding both concat segments."""

    def __init__(self, h: int = 5):
        super().__init__()
        self.a = nn.Linear(4, h)
        self.fc = nn.Linear(2 * h, 3)

    def forward(self, x):
        return self.fc(torch.cat([torch.tanh(self.a(x)), self.a(torch.relu(x))], 1))


TIED_CONCAT_YAML = """format: n2n-arch/1
inputs:
  x: {shape: [4], dtype: float32}
nodes:
  - {name: a, op: linear, in: x}
  - {name: ta, op: tanh, in: a}
  - {name: rx, op: relu, in: x}
  - {name: b, op: linear, in: rx, params: {weight: a.weight, bias: a.bias}}
  - {name: cat, op: concat, in: [ta, b]}
  - {name: fc, op: linear, in: cat}
outputs: [fc]
"""


def test_widen_a_tied_layer_that_feeds_a_concat_segment():
    """The tied layer `b` joined the group only after the concat had laid out its segments
    (`b`'s as untouched), so the concat then needed a second, different map: refused with "value
    'cat' would need two different unit maps". Ties are now followed before a concat resolves.
    Found by the long property run."""
    torch.manual_seed(2)
    teacher = TiedIntoConcat(5).eval()
    model = n2n.model_from_state_dict(TIED_CONCAT_YAML, teacher.state_dict())
    student_model, _ = widen(model, "a", 8, split="random", seed=4)
    student = TiedIntoConcat(8).eval()
    student.load_state_dict(student_model.tensors.to_dict())
    x = torch.randn(32, 4)
    with torch.no_grad():
        want, got = teacher(x), student(x)
    assert max_abs_diff(got, want) / float(want.abs().max()) <= 1e-5


def test_a_tie_the_widening_cannot_follow_is_refused_clearly():
    """A batchnorm sharing its statistics with one outside the group cannot be remapped alike."""
    yaml_text = """format: n2n-arch/1
inputs:
  x: {shape: [3, 4, 4], dtype: float32}
nodes:
  - {name: c1, op: conv2d, in: x}
  - {name: bn1, op: batchnorm, in: c1}
  - {name: c2, op: conv2d, in: x}
  - {name: bn2, op: batchnorm, in: c2, params: {running_mean: bn1.running_mean, running_var: bn1.running_var}}
  - {name: cat, op: concat, in: [bn1, bn2]}
  - {name: flat, op: flatten, in: cat}
  - {name: fc, op: linear, in: flat}
outputs: [fc]
"""
    g = torch.Generator().manual_seed(0)
    sd = {"c1.weight": torch.randn(4, 3, 1, 1, generator=g), "c2.weight": torch.randn(4, 3, 1, 1, generator=g),
          "bn1.running_mean": torch.randn(4, generator=g), "bn1.running_var": torch.rand(4, generator=g) + 0.5,
          "fc.weight": torch.randn(2, 128, generator=g)}
    model = n2n.model_from_state_dict(yaml_text, sd)
    with pytest.raises(N2NError, match=r"tensor 'bn1.running_(mean|var)' is shared with node 'bn2'"):
        widen(model, "c1", 6)


# ---------------------------------------------------------------------------- checkpoint headers


def test_header_dtype_that_is_not_a_string(runner, tmp_path):
    """A dtype of [] (any unhashable JSON value) crashed the header check with TypeError
    (exit 3, "internal error"). Found by test_fuzz_inputs."""
    w = struct.pack("<4f", 1, 2, 3, 4)
    ckpt = _raw_checkpoint(tmp_path / "bad.safetensors", {"fc.weight": {"dtype": [], "shape": [2, 2], "data_offsets": [0, 16]}}, w)
    _refused(runner.invoke(app, ["inspect", ckpt, "--arch", MLP_ARCH]), "bad.safetensors", "'fc.weight'", "dtype")


@pytest.mark.parametrize("where", ["tensor name", "metadata"])
def test_lone_surrogate_in_a_checkpoint_header(runner, tmp_path, where):
    """JSON may escape a lone surrogate ("\\udc80"); the reader accepted it and the writer then
    failed to encode the name (exit 3, UnicodeEncodeError). Now refused when read."""
    sd = load_file(MLP_CKPT)
    src = tmp_path / "ok.safetensors"
    save_file(sd, str(src), metadata={"format": "pt"})
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    if where == "metadata":
        header["__metadata__"]["note"] = "\udc80"
    else:
        end = len(data)
        header["\udc80"] = {"dtype": "F32", "shape": [0], "data_offsets": [end, end]}
    ckpt = _raw_checkpoint(tmp_path / "sur.safetensors", header, data)
    out = tmp_path / "out.safetensors"
    _refused(runner.invoke(app, ["deepen", ckpt, "--arch", MLP_ARCH, "--after", "relu1", "-o", str(out)]), "not valid Unicode")
    assert not out.exists()


def test_shape_dimension_beyond_int64(runner, tmp_path):
    """A header shape [2**64, 0] (zero bytes, so the offsets check passed) was accepted and
    copied into the output, a file no safetensors reader can open."""
    sd = {k: v.contiguous() for k, v in load_file(MLP_CKPT).items()}
    src = tmp_path / "ok.safetensors"
    save_file(sd, str(src))
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    header["z"] = {"dtype": "F32", "shape": [2**64, 0], "data_offsets": [len(data), len(data)]}
    ckpt = _raw_checkpoint(tmp_path / "huge.safetensors", header, data)
    _refused(runner.invoke(app, ["inspect", ckpt, "--arch", MLP_ARCH]), "'z'", "invalid shape")


# ---------------------------------------------------------------------------- sizes and NaN


def test_huge_width_is_refused_before_allocating(runner, tmp_path):
    """--width 10**12 tried to allocate the unit map (8 TB) and died with "internal error:
    RuntimeError: ... can't allocate memory" (exit 3)."""
    out = tmp_path / "out.safetensors"
    line = _refused(runner.invoke(app, ["widen", MLP_CKPT, "--arch", MLP_ARCH, "--layer", "fc1", "--width", str(10**12), "-o", str(out)]),
                    "would need about")
    assert "--width" in line
    assert not out.exists()


def test_huge_shapes_are_refused_before_verifying(runner, tmp_path):
    """An input shape of [10**23] reached torch as an int64 overflow: exit 3 with a multi-line
    C++ backtrace inside the "internal error" line."""
    arch = tmp_path / "huge.yaml"
    arch.write_text("format: n2n-arch/1\ninputs: {x: {shape: [100000000000000000000000]}}\n"
                    "nodes: [{name: r, op: relu, in: x}]\noutputs: [r]\n")
    ckpt = tmp_path / "e.safetensors"
    save_file({"unused": torch.zeros(1)}, str(ckpt))
    _refused(runner.invoke(app, ["verify", str(ckpt), str(ckpt), "--arch", str(arch)]), "would need about")


def test_nan_models_no_longer_verify_as_equal(runner, tmp_path):
    """Two checkpoints whose weights hold NaN "passed" verification (matching NaNs are equal and
    nothing else was compared), and surgery on them was written as verified."""
    sd = load_file(MLP_CKPT)
    sd["fc1.weight"][:] = float("nan")
    ckpt = tmp_path / "nan.safetensors"
    save_file(sd, str(ckpt))
    _refused(runner.invoke(app, ["verify", str(ckpt), str(ckpt), "--arch", MLP_ARCH]), "NaN or Inf", "--allow-nonfinite")
    result = runner.invoke(app, ["verify", str(ckpt), str(ckpt), "--arch", MLP_ARCH, "--allow-nonfinite"])
    # The user may go ahead, but NaN at the same place in both models is still not "equal".
    assert result.exit_code == 1


def test_check_allocation_names_the_step_and_the_figure():
    from n2nsurgery.guards import check_allocation

    with pytest.raises(N2NError, match=r"^widening 'x' to 10 units would need about "):
        check_allocation(2**63, "widening 'x' to 10 units", "choose a smaller --width")
    check_allocation(1024, "a small step", "nothing")  # fits: no error
