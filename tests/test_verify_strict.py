"""Stronger verification: values inside the models are compared, not only the outputs, and
nothing that is NaN or Inf ever compares equal (issue 12 and issue 13 item 4)."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

import n2nsurgery as n2n
from n2nsurgery.cli import app
from n2nsurgery.deepen import deepen
from n2nsurgery.errors import N2NError, VerificationFailed
from n2nsurgery.model import model_from_state_dict, save_model
from n2nsurgery.widen import widen

# The module, not the function n2nsurgery.verify that shadows it on the package.
verify_mod = importlib.import_module("n2nsurgery.verify")

# fc3 reads fc2 through tiny weights and adds a large bias: a change in fc2 barely reaches the
# output, the way a wrong remap deep inside an EfficientNet hid under its classifier.
QUIET_ARCH = """\
format: n2n-arch/1
inputs: {x: {shape: [4]}}
nodes:
  - {name: fc1, op: linear, in: x}
  - {name: relu1, op: relu, in: fc1}
  - {name: fc2, op: linear, in: relu1}
  - {name: relu2, op: relu, in: fc2}
  - {name: fc3, op: linear, in: relu2}
outputs: [fc3]
"""


def _quiet_teacher():
    g = torch.Generator().manual_seed(0)
    sd = {
        "fc1.weight": torch.randn(3, 4, generator=g),
        "fc1.bias": torch.rand(3, generator=g) + 0.5,
        "fc2.weight": torch.randn(3, 3, generator=g),
        "fc2.bias": torch.rand(3, generator=g) + 0.5,
        "fc3.weight": 1e-7 * torch.randn(2, 3, generator=g),
        "fc3.bias": torch.tensor([1.0, -1.0]),
    }
    return model_from_state_dict(QUIET_ARCH, sd)


def _wrong_widening(teacher):
    """fc1 widened 3 → 5 correctly, then one of fc2's new input columns doubled: a bug."""
    student, _ = widen(teacher, "fc1", 5, seed=0)
    w = student.tensors.get("fc2.weight").clone()
    w[:, 4] *= 2
    return student.replace(tensors=student.tensors.with_changes({"fc2.weight": w}))


def _save(model, path) -> str:
    save_model(model, str(path))
    return str(path)


# ------------------------------------------------------------------ intermediates


def test_wrong_widening_hidden_in_the_outputs_fails_on_the_value_inside():
    teacher = _quiet_teacher()
    wrong = _wrong_widening(teacher)
    outputs_only = n2n.verify(teacher, wrong, device="cpu", intermediates=False)
    assert outputs_only.passed  # the bug is invisible at the output...
    full = n2n.verify(teacher, wrong, device="cpu")
    assert not full.passed  # ...but not right after it
    inner = full.intermediates
    assert inner.worst.name == "fc2" and not inner.worst.passed
    assert inner.worst.max_abs > 1000 * inner.worst.bound
    assert inner.failures == ["fc2", "relu2"]
    # fc1 and relu1 changed width: skipped; fc2 and relu2 compared; fc3 is an output
    assert (inner.compared, inner.skipped_shape) == (2, 2)
    assert "the value of node 'fc2' inside the models differs by" in full.describe_failure()


def test_wrong_widening_fails_n2n_verify_unless_outputs_only(runner, tmp_path):
    teacher = _quiet_teacher()
    a = _save(teacher, tmp_path / "a.safetensors")
    b = _save(_wrong_widening(teacher), tmp_path / "b.safetensors")
    result = runner.invoke(app, ["verify", a, b, "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "node 'fc2' inside the models differs by" in result.stderr
    assert "worst of 2 inside: fc2" in result.stderr
    result = runner.invoke(app, ["verify", a, b, "--device", "cpu", "--outputs-only"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["verify", a, b, "--device", "cpu", "--json"])
    report = json.loads(result.stdout)
    assert report["passed"] is False and report["outputs"][0]["passed"] is True
    assert report["intermediates"]["worst"]["name"] == "fc2" and report["intermediates"]["failed"] == 2


def test_commit_refuses_the_wrong_widening_and_writes_nothing(tmp_path):
    teacher = _quiet_teacher()
    out = tmp_path / "student.safetensors"
    with pytest.raises(VerificationFailed, match=r"^the surgery is not function-preserving: the outputs agree, but the value of node 'fc2'"):
        n2n.commit(teacher, _wrong_widening(teacher), str(out), device="cpu")
    assert not out.exists()
    done = n2n.commit(teacher, _wrong_widening(teacher), str(out), device="cpu", outputs_only=True)
    assert done.written and done.verification.intermediates is None


def test_a_correct_widening_compares_the_consumers_and_passes():
    teacher = _quiet_teacher()
    student, _ = widen(teacher, "fc1", 5, seed=0)
    result = n2n.verify(teacher, student, device="cpu")
    assert result.passed and result.intermediates.compared == 2 and result.intermediates.failed == 0


def test_after_a_deepening_the_new_node_is_skipped_and_the_rest_compared():
    teacher = _quiet_teacher()
    student, _ = deepen(teacher, "relu1")
    result = n2n.verify(teacher, student, device="cpu")
    assert result.passed
    # fc1, relu1, fc2, relu2: every teacher node but the output; the new layer exists in B only
    assert result.intermediates.compared == 4 and result.intermediates.skipped_shape == 0


def test_values_that_would_wait_too_long_are_skipped_not_held(monkeypatch):
    teacher = _quiet_teacher()
    student, _ = deepen(teacher, "relu1")
    monkeypatch.setattr(verify_mod, "PENDING_BYTES", 0)
    result = n2n.verify(teacher, student, device="cpu")
    assert result.passed
    inner = result.intermediates
    assert inner.skipped_memory > 0 and inner.compared + inner.skipped_memory == 4


def test_lockstep_leaves_no_global_mode_behind():
    teacher = _quiet_teacher()
    student, _ = deepen(teacher, "relu1")
    precision = torch.get_float32_matmul_precision()
    n2n.verify(teacher, student, device="cpu")
    assert not torch.is_inference_mode_enabled()
    assert torch.get_float32_matmul_precision() == precision


def test_lockstep_gives_the_outputs_a_single_run_gives():
    from n2nsurgery.executor import run

    teacher = _quiet_teacher()
    student, _ = widen(teacher, "fc1", 5, seed=0)
    result = n2n.verify(teacher, student, device="cpu", probes=10)
    x = verify_mod.make_probes(teacher.arch, 10, 0)
    (ya,), (yb,) = run(teacher, x), run(student, x)
    assert result.outputs[0].max_abs == float((ya.double() - yb.double()).abs().max())


# ------------------------------------------------------------------ NaN and Inf


def test_compare_outputs_never_calls_nonfinite_equal():
    teacher = _quiet_teacher()
    nan = torch.tensor([[1.0, float("nan")]])
    inf = torch.tensor([[1.0, float("inf")]])
    ok = torch.tensor([[1.0, 2.0]])
    for ya, yb in [(nan, nan), (inf, inf), (ok, nan), (ok, inf), (nan, ok)]:
        (check,) = verify_mod.compare_outputs(teacher, teacher, [ya], [yb], 1e-5, 1e-4)
        assert not check.passed, (ya, yb)
    (check,) = verify_mod.compare_outputs(teacher, teacher, [ok], [inf], 1e-5, 1e-4)
    assert check.max_abs == math.inf and (check.nonfinite_a, check.nonfinite_b, check.numel) == (0, 1, 2)


def _nonfinite_outputs(tmp_path, kind: str) -> str:
    """Finite parameters whose outputs are not: a batchnorm running_var of -1 (NaN), or
    weights of 3e38 (Inf)."""
    arch = """\
format: n2n-arch/1
inputs: {x: {shape: [4]}}
nodes:
  - {name: fc1, op: linear, in: x}
  - {name: bn1, op: batchnorm, in: fc1}
  - {name: relu1, op: relu, in: bn1}
  - {name: fc2, op: linear, in: relu1}
outputs: [fc2]
"""
    g = torch.Generator().manual_seed(1)
    sd = {
        "fc1.weight": torch.randn(3, 4, generator=g),
        "fc1.bias": torch.zeros(3),
        "bn1.running_mean": torch.zeros(3),
        "bn1.running_var": -torch.ones(3) if kind == "nan" else torch.ones(3),
        "fc2.weight": torch.full((2, 3), 3e38) if kind == "inf" else torch.randn(2, 3, generator=g),
        "fc2.bias": torch.zeros(2),
    }
    path = tmp_path / f"{kind}.safetensors"
    save_model(model_from_state_dict(arch, sd), str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_verify_of_a_model_with_nonfinite_outputs_exits_1(runner, tmp_path, kind):
    ckpt = _nonfinite_outputs(tmp_path, kind)
    result = runner.invoke(app, ["verify", ckpt, ckpt, "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "output 'fc2' is not finite on the probes" in result.stderr
    assert "NaN or Inf never compares equal" in result.stderr
    assert "equal within" not in result.stderr


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("command", [["widen", "--layer", "fc1", "--width", "5"], ["deepen", "--after", "relu1"]])
def test_surgery_on_a_teacher_with_nonfinite_outputs_is_refused(runner, tmp_path, kind, command):
    ckpt = _nonfinite_outputs(tmp_path, kind)
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, [command[0], ckpt, *command[1:], "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert f"{kind}.safetensors: the teacher's output 'fc2' is NaN/Inf on the probes" in lines[0]
    assert "so the student cannot be verified; fix the checkpoint or pass --no-verify" in lines[0]
    assert not out.exists()


def test_apply_on_a_teacher_with_nonfinite_outputs_is_refused(runner, tmp_path):
    ckpt = _nonfinite_outputs(tmp_path, "nan")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("seed: 0\nsteps:\n  - widen: {layer: fc1, width: 5}\n")
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["apply", ckpt, str(recipe), "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "the teacher's output 'fc2' is NaN/Inf on the probes" in result.stderr
    assert not out.exists()


def test_a_student_that_turns_nan_fails_where_the_teacher_is_finite():
    teacher = _quiet_teacher()
    student, _ = widen(teacher, "fc1", 5, seed=0)
    b = student.tensors.get("fc3.bias").clone()
    b[0] = float("nan")
    broken = student.replace(tensors=student.tensors.with_changes({"fc3.bias": b}))
    with pytest.raises(VerificationFailed, match=r"output 'fc3' is not finite on the probes: 0 of 128 values are NaN or Inf in the teacher and 64 in the student"):
        n2n.commit(teacher, broken, None, device="cpu")


def test_intermediates_where_the_teacher_is_not_finite_are_skipped():
    teacher = _quiet_teacher()
    tracker = verify_mod._Intermediates(teacher, teacher, 1e-5, 1e-4)
    tracker.compare("fc2", torch.tensor([float("nan")]), torch.tensor([float("nan")]))
    tracker.compare("relu2", torch.tensor([1.0]), torch.tensor([float("inf")]))
    summary = tracker.summary(teacher.shapes)
    assert summary.skipped_nonfinite == 1 and summary.failures == ["relu2"]


def test_nonfinite_output_check_is_an_input_error_not_a_bug():
    teacher = _quiet_teacher()
    b = teacher.tensors.get("fc3.bias").clone()
    b[:] = float("inf")
    bad = teacher.replace(tensors=teacher.tensors.with_changes({"fc3.bias": b}))
    with pytest.raises(N2NError) as e:
        n2n.commit(bad, bad, None, device="cpu", allow_nonfinite=True)
    assert e.value.exit_code == 2 and "the teacher's output 'fc3' is NaN/Inf" in str(e.value)



def test_intermediates_accumulate_over_probe_chunks():
    """More probes than one chunk: each value's figures are the worst over every chunk."""
    teacher = _quiet_teacher()
    wrong = _wrong_widening(teacher)
    one = n2n.verify(teacher, wrong, device="cpu", probes=verify_mod.PROBE_CHUNK)
    many = n2n.verify(teacher, wrong, device="cpu", probes=2 * verify_mod.PROBE_CHUNK + 3)
    assert many.intermediates.compared == one.intermediates.compared == 2
    assert many.intermediates.worst.max_abs >= one.intermediates.worst.max_abs  # the first chunk is the same probes
    assert not many.passed


@pytest.mark.parametrize("command", [["widen", "--layer", "fc1", "--width", "5"], ["deepen", "--after", "relu1"]])
def test_surgery_json_reports_the_intermediates(runner, tmp_path, command):
    ckpt = _save(_quiet_teacher(), tmp_path / "t.safetensors")
    result = runner.invoke(app, [command[0], ckpt, *command[1:], "--dry-run", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    inner = json.loads(result.stdout)["verification"]["intermediates"]
    assert inner["compared"] >= 2 and inner["failed"] == 0 and inner["worst"]["passed"] is True
    result = runner.invoke(app, [command[0], ckpt, *command[1:], "--dry-run", "--json", "--device", "cpu", "--outputs-only"])
    assert json.loads(result.stdout)["verification"]["intermediates"] is None
