"""n2n.commit: the one safety chain the CLI, recipes and Python users share, and --dry-run."""

from __future__ import annotations

import json
import os

import pytest

import n2nsurgery as n2n
from conftest import RECIPES, example_paths
from n2nsurgery.cli import app
from n2nsurgery.deepen import deepen
from n2nsurgery.errors import N2NError
from n2nsurgery.recipe import apply_recipe, load_recipe
from n2nsurgery.widen import widen

MLP_CKPT, MLP_ARCH = example_paths("mlp")
MLP_RECIPE = str(RECIPES / "mlp-wider-deeper.yaml")


def _files(folder) -> set:
    return set(os.listdir(folder))


# ------------------------------------------------------------------ the API


def test_commit_writes_the_same_bytes_as_the_cli(runner, tmp_path):
    cli_out, api_out = tmp_path / "cli.safetensors", tmp_path / "api.safetensors"
    result = runner.invoke(app, ["widen", MLP_CKPT, "--arch", MLP_ARCH, "--layer", "fc1", "--width", "40",
                                 "--seed", "3", "--device", "cpu", "-o", str(cli_out)])
    assert result.exit_code == 0, result.output
    teacher = n2n.load_model(MLP_CKPT, MLP_ARCH)
    student, _ = widen(teacher, "fc1", 40, seed=3)
    done = n2n.commit(teacher, student, str(api_out), seed=3, device="cpu", what="widening 'fc1'")
    assert done.written and not done.dry_run and done.output == str(api_out)
    assert done.verification.passed and done.verification.intermediates.compared > 0
    assert api_out.read_bytes() == cli_out.read_bytes()


def test_commit_without_out_checks_and_writes_nothing(tmp_path):
    teacher = n2n.load_model(MLP_CKPT, MLP_ARCH)
    student, _ = deepen(teacher, "relu1")
    before = _files(tmp_path)
    done = n2n.commit(teacher, student, None, device="cpu")
    assert done.verification.passed and not done.written and done.output is None
    assert _files(tmp_path) == before
    assert student.history[-1]["verification"]["passed"] is True  # recorded as before
    assert done.to_dict()["verification"]["intermediates"]["failed"] == 0


def test_commit_refuses_the_input_as_output_before_verifying():
    teacher = n2n.load_model(MLP_CKPT, MLP_ARCH)
    student, _ = widen(teacher, "fc1", 40)
    with pytest.raises(N2NError, match="is the input"):
        n2n.commit(teacher, student, MLP_CKPT, device="cpu")
    with pytest.raises(N2NError, match="is the input"):  # a dry run predicts the refusal
        n2n.commit(teacher, student, MLP_CKPT, device="cpu", dry_run=True)


def test_commit_dry_run_names_the_output_and_writes_nothing(tmp_path):
    teacher = n2n.load_model(MLP_CKPT, MLP_ARCH)
    student, _ = widen(teacher, "fc1", 40)
    out = tmp_path / "s.safetensors"
    done = n2n.commit(teacher, student, str(out), device="cpu", dry_run=True)
    assert done.dry_run and not done.written and done.output == str(out) and not out.exists()


def test_commit_with_noise_measures_the_deviation():
    teacher = n2n.load_model(MLP_CKPT, MLP_ARCH)
    student, report = widen(teacher, "fc1", 40, noise=0.01)
    done = n2n.commit(teacher, student, None, device="cpu", noise_free=report.noise_free)
    assert done.verification.passed and done.noise_deviation["max_abs"] > 0


def test_apply_recipe_runs_the_chain_and_writes(tmp_path):
    teacher = n2n.load_model(MLP_CKPT, MLP_ARCH)
    out = tmp_path / "r.safetensors"
    student, reports = apply_recipe(teacher, load_recipe(MLP_RECIPE), device="cpu", out=str(out))
    assert out.exists() and all(r.verification.intermediates is not None for r in reports)
    with pytest.raises(N2NError, match="is the input"):  # before any step runs
        apply_recipe(teacher, load_recipe(MLP_RECIPE), device="cpu", out=MLP_RECIPE)


# ------------------------------------------------------------------ --dry-run

SURGERY = {
    "widen": ["widen", MLP_CKPT, "--arch", MLP_ARCH, "--layer", "fc1", "--width", "40", "--device", "cpu"],
    "deepen": ["deepen", MLP_CKPT, "--arch", MLP_ARCH, "--after", "relu1", "--device", "cpu"],
    "apply": ["apply", MLP_CKPT, MLP_RECIPE, "--arch", MLP_ARCH, "--device", "cpu"],
}


@pytest.mark.parametrize("command", list(SURGERY))
def test_dry_run_without_output_reports_and_writes_nothing(runner, tmp_path, command, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, SURGERY[command] + ["--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dry_run"] is True and report["output"] is None
    assert _files(tmp_path) == set()
    result = runner.invoke(app, SURGERY[command] + ["--dry-run"])
    assert result.exit_code == 0, result.output
    assert "dry run: nothing written" in result.stderr and "wrote" not in result.stderr


@pytest.mark.parametrize("command", list(SURGERY))
def test_dry_run_with_output_names_it_and_writes_nothing(runner, tmp_path, command):
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, SURGERY[command] + ["--dry-run", "--json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dry_run"] is True and report["output"] == str(out)
    assert _files(tmp_path) == set()
    result = runner.invoke(app, SURGERY[command] + ["--dry-run", "-o", str(out)])
    assert f"dry run: nothing written (would write {out})" in result.stderr


@pytest.mark.parametrize("command", list(SURGERY))
def test_dry_run_predicts_a_real_runs_refusals(runner, tmp_path, command):
    missing = tmp_path / "no" / "out.safetensors"
    for output in (str(missing), MLP_CKPT):
        result = runner.invoke(app, SURGERY[command] + ["--dry-run", "-o", output])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", list(SURGERY))
def test_real_runs_report_dry_run_false(runner, tmp_path, command):
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, SURGERY[command] + ["--json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dry_run"] is False and out.exists()


@pytest.mark.parametrize("command", list(SURGERY))
def test_output_is_required_without_dry_run(runner, command):
    result = runner.invoke(app, SURGERY[command])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: missing option -o/--output: give the file to write, or --dry-run to check everything and write nothing"
    )


def test_dry_run_still_fails_verification(runner, tmp_path, monkeypatch):
    """A dry run is a real run minus the write: a student that fails verification exits 1."""
    from test_verify_strict import _quiet_teacher, _wrong_widening

    import n2nsurgery.widen as widen_module  # the command imports widen() when it runs
    from n2nsurgery.model import save_model

    ckpt = tmp_path / "quiet.safetensors"
    save_model(_quiet_teacher(), str(ckpt))
    monkeypatch.setattr(widen_module, "widen", lambda teacher, *a, **k: (_wrong_widening(teacher), widen(teacher, "fc1", 5)[1]))
    result = runner.invoke(app, ["widen", str(ckpt), "--layer", "fc1", "--width", "5", "--dry-run", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "error: widening 'fc1' is not function-preserving: the outputs agree, but the value of node 'fc2'" in result.stderr
    assert _files(tmp_path) == {"quiet.safetensors"}


def test_apply_reports_the_intermediates_of_every_step_unless_outputs_only(runner):
    result = runner.invoke(app, SURGERY["apply"] + ["--dry-run", "--json"])
    report = json.loads(result.stdout)
    assert all(s["verification"]["intermediates"]["compared"] > 0 for s in report["steps"])
    assert report["end_to_end"]["intermediates"]["failed"] == 0
    result = runner.invoke(app, SURGERY["apply"] + ["--dry-run", "--json", "--outputs-only"])
    report = json.loads(result.stdout)
    assert all(s["verification"]["intermediates"] is None for s in report["steps"])
    assert report["end_to_end"]["intermediates"] is None
