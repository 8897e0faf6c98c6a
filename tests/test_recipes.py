"""`n2n apply` and recipes: every shipped recipe against its torch.nn teacher, strict validation,
failures that write nothing, seeds, and history that accumulates across runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import RECIPES, assert_close, example_paths, max_abs_diff, n2n_exe, requires_cuda
from n2nsurgery import examples, load_model
from n2nsurgery.cli import app
from n2nsurgery.errors import N2NError
from n2nsurgery.executor import run
from n2nsurgery.recipe import apply_recipe, load_recipe, parse_recipe, step_seed

TOL = 1e-5  # float32 students against their teachers, max |Δ| over every output element

# recipe file -> (teacher checkpoint stem, example name, the teacher's widths)
SHIPPED = {
    "inception-wider.yaml": ("inception-half", "inception", examples.INCEPTION_HALF_WIDTHS),
    "resnet-deeper.yaml": ("resnet", "resnet", {}),
    "resnet-sqrt2.yaml": ("resnet", "resnet", {}),
    "mlp-wider-deeper.yaml": ("mlp", "mlp", {}),
    "cnn-wider-deeper.yaml": ("cnn", "cnn", {}),
}
# Recipes that grow the tiny transformers: run and checked in test_deepen_blocks.py.
TRANSFORMER_RECIPES = {"llama-tiny-grow.yaml", "gpt2-tiny-grow.yaml"}


def _probe(model_name: str, n: int = 32) -> torch.Tensor:
    shape = {"mlp": (16,), "cnn": (3, 8, 6), "resnet": (3, 8, 8), "inception": (3, 8, 8)}[model_name]
    return torch.randn((n,) + shape, generator=torch.Generator().manual_seed(123))


def _apply(runner, tmp_path, recipe: str, teacher: str = "cnn", extra=(), out_name="out.safetensors"):
    ckpt, arch = str(RECIPES / f"{teacher}.safetensors"), str(RECIPES / f"{teacher}.yaml")
    out = tmp_path / out_name
    result = runner.invoke(app, ["apply", ckpt, str(recipe), "--arch", arch, "-o", str(out), *extra])
    return result, out


def _write(tmp_path, text: str, name="recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ------------------------------------------------------------------ every shipped recipe


def test_every_recipe_file_in_recipes_is_exercised():
    """A recipe added to recipes/ without a test here fails this test."""
    recipe_files = {p.name for p in RECIPES.glob("*.yaml") if "steps" in (yaml.safe_load(p.read_text()) or {})}
    assert recipe_files == set(SHIPPED) | TRANSFORMER_RECIPES


@pytest.mark.parametrize("recipe_name", sorted(SHIPPED))
def test_shipped_recipe_preserves_the_torch_teacher(runner, tmp_path, recipe_name):
    stem, example, widths = SHIPPED[recipe_name]
    result, out = _apply(runner, tmp_path, RECIPES / recipe_name, teacher=stem)
    assert result.exit_code == 0, result.output
    assert out.exists()

    teacher = examples.build(example, **widths)  # an ordinary torch.nn module, not our executor
    student = load_model(str(out))  # carries its own architecture now
    x = _probe(example)
    with torch.no_grad():
        want = teacher(x)
    (got,) = run(student, {"x": x})
    assert_close(got, want, TOL)

    recipe = load_recipe(str(RECIPES / recipe_name))
    assert len(student.history) == len(recipe.steps)
    for i, (entry, step) in enumerate(zip(student.history, recipe.steps), 1):
        assert entry["op"] == step.kind
        assert entry["recipe"]["file"] == recipe_name and entry["recipe"]["step"] == i
        assert entry["verification"]["passed"] is True
        assert entry["seed"] == step_seed(recipe.seed, i)
    # the student really grew: it is not the teacher passed through
    assert student.parameter_count() > load_model(str(RECIPES / f"{stem}.safetensors"), str(RECIPES / f"{stem}.yaml")).parameter_count()


def test_inception_wider_student_loads_into_the_full_width_torch_module(runner, tmp_path):
    """The paper's Net2WiderNet shape: half-width teacher → exactly the full-width module's shapes."""
    result, out = _apply(runner, tmp_path, RECIPES / "inception-wider.yaml", teacher="inception-half")
    assert result.exit_code == 0, result.output
    half = examples.build("inception", **examples.INCEPTION_HALF_WIDTHS)
    full = examples.Inception().eval()  # default widths: the shipped full-width example
    student_sd = {k: v.clone() for k, v in load_model(str(out)).tensors.to_dict().items()}
    full.load_state_dict(student_sd, strict=True)  # every shape matches the full-width module
    x = _probe("inception")
    with torch.no_grad():
        d = max_abs_diff(full(x), half(x))
    assert d <= TOL, d


def test_mlp_recipe_widths(runner, tmp_path):
    result, out = _apply(runner, tmp_path, RECIPES / "mlp-wider-deeper.yaml", teacher="mlp")
    assert result.exit_code == 0, result.output
    m = load_model(str(out))
    assert m.tensors.shape("fc1.weight") == (64, 16)
    assert m.tensors.shape("fc2.weight") == (64, 64)
    assert m.tensors.shape("fc2b.weight") == (64, 64)
    assert [n.name for n in m.arch.nodes if n.op == "linear"] == ["fc1", "relu1_deep", "fc2", "fc2b", "fc3"]


def test_resnet_sqrt2_widens_the_coupled_residual_partners(runner, tmp_path):
    result, out = _apply(runner, tmp_path, RECIPES / "resnet-sqrt2.yaml", teacher="resnet")
    assert result.exit_code == 0, result.output
    m = load_model(str(out))
    # stem and b1_conv2 meet at b1_add; b2_conv2 and b2_proj meet at b2_add
    assert m.tensors.shape("stem.weight")[0] == m.tensors.shape("b1_conv2.weight")[0] == 11
    assert m.tensors.shape("b2_conv2.weight")[0] == m.tensors.shape("b2_proj.weight")[0] == 17
    assert m.tensors.shape("b1_conv1.weight")[0] == 11 and m.tensors.shape("b2_conv1.weight")[0] == 17


def test_summary_table_and_json(runner, tmp_path):
    result, out = _apply(runner, tmp_path, RECIPES / "cnn-wider-deeper.yaml")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # human output on stderr only
    for text in ("recipe applied", "widen conv1", "conv1 8 → 64", "deepen relu2", "final vs original", "pass"):
        assert text in result.stderr, text

    out2 = tmp_path / "again.safetensors"
    r = runner.invoke(app, ["apply", example_paths("cnn")[0], str(RECIPES / "cnn-wider-deeper.yaml"),
                            "--arch", example_paths("cnn")[1], "-o", str(out2), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [s["kind"] for s in doc["steps"]] == ["widen", "widen", "deepen"]
    assert doc["steps"][0]["report"]["new_width"] == 64
    assert all(s["verification"]["passed"] for s in doc["steps"])
    assert doc["end_to_end"]["passed"] is True and doc["end_to_end"]["judged"] is True and doc["end_to_end"]["max_abs"] <= TOL
    assert doc["parameters"]["after"] > doc["parameters"]["before"]
    reshaped = {t["key"]: (t["old_shape"], t["new_shape"]) for t in doc["steps"][0]["changes"]["tensors_reshaped"]}
    assert reshaped["conv1.weight"] == ([8, 3, 3, 3], [64, 3, 3, 3])
    assert out.read_bytes() == out2.read_bytes()  # same recipe, same seed: same bytes


# ---------------------------------------------------------------- failures write nothing


def _leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.suffix != ".yaml")


def test_refused_step_names_the_step_and_writes_nothing(runner, tmp_path):
    recipe = _write(tmp_path, "steps:\n  - widen: {layer: conv1, width: 16}\n  - widen: {layer: conv1, width: 12}\n")
    result, out = _apply(runner, tmp_path, recipe)
    assert result.exit_code == 2
    assert "step 2 (widen conv1):" in result.stderr
    assert "not larger than" in result.stderr
    assert "Traceback" not in result.output
    assert not out.exists() and _leftovers(tmp_path) == []


def test_unknown_layer_in_a_later_step_names_the_step(runner, tmp_path):
    recipe = _write(tmp_path, "steps:\n  - widen: {layer: conv1, width: 16}\n  - deepen: {after: relu9}\n")
    result, out = _apply(runner, tmp_path, recipe)
    assert result.exit_code == 2
    assert "step 2 (deepen relu9)" in result.stderr and "relu" in result.stderr
    assert not out.exists()


def test_verification_failure_in_step_2_exits_1_and_writes_nothing(runner, tmp_path, monkeypatch):
    import n2nsurgery.widen as widen_mod

    real = widen_mod.widen

    def broken(model, layer, width, **kw):  # a widening bug: one bias entry off by 0.5
        student, report = real(model, layer, width, **kw)
        key = f"{layer}.bias"
        bias = student.tensors.get(key).clone()
        bias[0] += 0.5
        return student.replace(tensors=student.tensors.with_changes({key: bias})), report

    calls = []

    def second_step_broken(model, layer, width, **kw):
        calls.append(layer)
        return (real if len(calls) == 1 else broken)(model, layer, width, **kw)

    monkeypatch.setattr(widen_mod, "widen", second_step_broken)
    recipe = _write(tmp_path, "steps:\n  - widen: {layer: conv1, width: 16}\n  - widen: {layer: conv2, width: 16}\n")
    result, out = _apply(runner, tmp_path, recipe)
    assert calls == ["conv1", "conv2"]
    assert result.exit_code == 1
    assert "step 2 (widen conv2) is not function-preserving" in result.stderr
    assert "FAIL" in result.stderr  # the verification table of the failing step
    assert not out.exists() and _leftovers(tmp_path) == []


def test_no_verify_skips_checks_and_records_it(runner, tmp_path):
    recipe = _write(tmp_path, "steps:\n  - widen: {layer: conv1, width: 16}\nverify: false\n")
    result, out = _apply(runner, tmp_path, recipe)
    assert result.exit_code == 0, result.output
    assert "not verified" in result.stderr
    assert load_model(str(out)).history[-1]["verification"] is None
    # --verify on the command line overrides the recipe's verify: false
    result, out = _apply(runner, tmp_path, recipe, extra=["--verify"], out_name="v.safetensors")
    assert result.exit_code == 0, result.output
    assert load_model(str(out)).history[-1]["verification"]["passed"] is True
    # and --no-verify overrides verify: true
    plain = _write(tmp_path, "steps:\n  - widen: {layer: conv1, width: 16}\n", "plain.yaml")
    result, out = _apply(runner, tmp_path, plain, extra=["--no-verify"], out_name="nv.safetensors")
    assert result.exit_code == 0 and load_model(str(out)).history[-1]["verification"] is None


def test_noise_step_is_checked_noise_free_and_its_deviation_reported(runner, tmp_path):
    noisy = _write(tmp_path, "steps:\n  - widen: {layer: fc1, width: 48, noise: 0.05}\n  - deepen: {after: relu1}\n")
    result, out = _apply(runner, tmp_path, noisy, teacher="mlp", extra=["--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    dev = doc["steps"][0]["noise_deviation"]["max_abs"]
    assert dev > 1e-4  # the noise does move the outputs
    assert doc["steps"][0]["verification"]["max_abs"] <= TOL  # the noise-free map is exact
    assert load_model(str(out)).history[0]["verification"]["noise_deviation"]["max_abs"] == dev
    assert doc["end_to_end"]["judged"] is False and doc["end_to_end"]["max_abs"] > 1e-4  # measured, not judged
    # a tolerance in the recipe judges the noise
    strict = _write(tmp_path, "steps:\n  - widen: {layer: fc1, width: 48, noise: 0.05}\nverify: {atol: 1.0e-6, rtol: 0}\n", "strict.yaml")
    result, out = _apply(runner, tmp_path, strict, teacher="mlp", out_name="strict.safetensors")
    assert result.exit_code == 1
    assert "step 1 (widen fc1): the noise" in result.stderr and not out.exists()


# ------------------------------------------------------------------------------ seeds


def test_step_seed_is_deterministic_and_distinct():
    assert step_seed(0, 1) == step_seed(0, 1)
    seeds = {step_seed(s, i) for s in range(5) for i in range(1, 6)}
    assert len(seeds) == 25 and all(0 <= x < 2**31 for x in seeds)


def test_a_step_with_its_own_seed_matches_the_single_command():
    from n2nsurgery.widen import widen

    teacher = load_model(*example_paths("cnn"))
    recipe = parse_recipe("seed: 3\nsteps:\n  - widen: {layer: conv1, width: 13, split: random, seed: 7}\n")
    student, reports = apply_recipe(teacher, recipe, device="cpu")
    direct, _ = widen(teacher, "conv1", 13, split="random", seed=7)
    assert reports[0].seed == 7 and student.history[-1]["seed"] == 7
    for k in direct.tensors.keys():
        assert torch.equal(student.tensors.get(k), direct.tensors.get(k)), k


def test_seed_override_changes_the_random_choices(runner, tmp_path):
    recipe = _write(tmp_path, "seed: 0\nsteps:\n  - widen: {layer: conv1, width: 13, split: random}\n")
    r0, out0 = _apply(runner, tmp_path, recipe, out_name="s0.safetensors")
    r1, out1 = _apply(runner, tmp_path, recipe, extra=["--seed", "1"], out_name="s1.safetensors")
    assert r0.exit_code == r1.exit_code == 0
    a, b = load_model(str(out0)), load_model(str(out1))
    assert b.history[-1]["seed"] == step_seed(1, 1) != a.history[-1]["seed"]
    assert not torch.equal(a.tensors.get("conv2.weight"), b.tensors.get("conv2.weight"))


def test_same_seed_same_bytes_across_processes(tmp_path):
    exe = n2n_exe()
    ckpt, arch = example_paths("resnet")
    outs = []
    for i in range(2):
        out = tmp_path / f"p{i}.safetensors"
        subprocess.run([exe, "apply", ckpt, str(RECIPES / "resnet-sqrt2.yaml"), "--arch", arch, "-o", str(out),
                        "--no-verify"], check=True, capture_output=True)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


# ------------------------------------------------------------------------- provenance


def test_history_accumulates_across_runs_and_inspect_shows_it(runner, tmp_path, monkeypatch):
    from n2nsurgery.cli.common import console

    monkeypatch.setattr(console, "_width", 250)  # keep table cells on one line for the asserts
    first, out1 = _apply(runner, tmp_path, RECIPES / "cnn-wider-deeper.yaml", out_name="one.safetensors")
    assert first.exit_code == 0, first.output
    more = _write(tmp_path, "seed: 5\nsteps:\n  - deepen: {after: relu1, name: extra}\n", "more.yaml")
    out2 = tmp_path / "two.safetensors"
    r = runner.invoke(app, ["apply", str(out1), str(more), "-o", str(out2)])  # no --arch: it travels
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["widen", str(out2), "--layer", "extra", "--width", "80", "-o", str(tmp_path / "three.safetensors")])
    assert r.exit_code == 0, r.output

    history = load_model(str(tmp_path / "three.safetensors")).history
    assert [h["op"] for h in history] == ["widen", "widen", "deepen", "deepen", "widen"]
    assert [h.get("recipe", {}).get("file") for h in history] == ["cnn-wider-deeper.yaml"] * 3 + ["more.yaml", None]
    assert history[3]["seed"] == step_seed(5, 1) and history[3]["args"]["after"] == "relu1"
    assert history[4]["args"]["width"] == 80
    import n2nsurgery

    assert all(h["version"] == n2nsurgery.__version__ for h in history)
    assert all(h["verification"]["passed"] for h in history)
    sha = history[0]["recipe"]["sha256"]
    assert len(sha) == 64 and sha == load_recipe(str(RECIPES / "cnn-wider-deeper.yaml")).sha256

    shown = runner.invoke(app, ["inspect", str(tmp_path / "three.safetensors")])
    assert shown.exit_code == 0
    for text in ("history", "cnn-wider-deeper.yaml:1", "more.yaml:1", "width=80", "pass"):
        assert text in shown.stderr, text
    as_json = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "three.safetensors"), "--json"]).stdout)
    assert as_json["history"] == history


def test_inspect_without_history_prints_no_history_table(runner):
    r = runner.invoke(app, ["inspect", *example_paths("mlp")[:1], "--arch", example_paths("mlp")[1]])
    assert r.exit_code == 0 and "history" not in r.stderr


# ------------------------------------------------------------------ strict validation

BAD = [
    ("seed: 0\nstep:\n  - widen: {layer: a, width: 2}\n", "unknown top-level key 'step' (did you mean 'steps'?)"),
    ("steps:\n  - widden: {layer: a, width: 2}\n", "step 1: unknown step kind 'widden' (did you mean 'widen'?)"),
    ("steps:\n  - widen: {layer: a, widht: 2}\n", "step 1 (widen): unknown key 'widht' (did you mean 'width'?)"),
    ("steps:\n  - widen: {layer: a, width: 2}\n  - widen: {layer: a, width: abc}\n", "step 2 (widen): width must be an integer > 0, got 'abc'"),
    ("steps:\n  - widen: {layer: a, width: 2.5}\n", "step 1 (widen): width must be an integer > 0, got 2.5"),
    ("steps:\n  - widen: {layer: a, width: true}\n", "step 1 (widen): width must be an integer > 0, got True"),
    ("steps:\n  - widen: {layer: a, width: 0}\n", "step 1 (widen): width must be an integer > 0, got 0"),
    ("steps:\n  - widen: {layer: a}\n", "step 1 (widen): missing 'width'"),
    ("steps:\n  - widen: {width: 3}\n", "step 1 (widen): missing 'layer'"),
    ("steps:\n  - widen: {layer: a, width: 3, split: equall}\n", "step 1 (widen): split must be one of equal, random, zero, average, tile, got 'equall'"),
    ("steps:\n  - widen: {layer: a, width: 3, noise: -1}\n", "step 1 (widen): noise must be a number >= 0, got -1"),
    ("steps:\n  - deepen: {after: r, kernel_size: 2}\n", "step 1 (deepen): kernel_size must be an odd integer > 0, got 2"),
    ("steps:\n  - deepen: {after: r, batchnorm: yes please}\n", "step 1 (deepen): batchnorm must be true or false, got 'yes please'"),
    ("steps:\n  - deepen: {after: r, op: convolution}\n", "step 1 (deepen): op must be one of auto, linear, conv, residual, got 'convolution'"),
    ("steps:\n  - deepen: {after: r, kernelsize: 3}\n", "step 1 (deepen): unknown key 'kernelsize' (did you mean 'kernel_size'?)"),
    ("steps:\n  - deepen: {afterr: r}\n", "step 1 (deepen): unknown key 'afterr' (did you mean 'after'?)"),
    ("steps:\n  - deepen: {after: r, hidden: 0}\n", "step 1 (deepen): hidden must be an integer > 0, got 0"),
    ("steps:\n  - {widen: {layer: a, width: 2}, deepen: {after: r}}\n", "step 1: a step is a mapping with exactly one key"),
    ("steps:\n  - widen\n", "step 1: a step is a mapping with exactly one key"),
    ("steps:\n  - widen: fc1\n", "step 1 (widen): expected a mapping of arguments"),
    ("steps: []\n", "steps must be a non-empty list"),
    ("seed: 0\n", "steps must be a non-empty list"),
    ("seed: -1\nsteps:\n  - deepen: {after: r}\n", "seed must be an integer >= 0, got -1"),
    ("seed: one\nsteps:\n  - deepen: {after: r}\n", "seed must be an integer >= 0, got 'one'"),
    ("steps:\n  - deepen: {after: r}\nverify: {probs: 8}\n", "verify: unknown key 'probs' (did you mean 'probes'?)"),
    ("steps:\n  - deepen: {after: r}\nverify: {probes: 0}\n", "verify: probes must be an integer > 0, got 0"),
    ("steps:\n  - deepen: {after: r}\nverify: {atol: -1}\n", "verify: atol must be a number >= 0, got -1"),
    ("steps:\n  - deepen: {after: r}\nverify: {device: gpu}\n", "verify: device must be one of auto, cpu, cuda, got 'gpu'"),
    ("steps:\n  - deepen: {after: r}\nverify: maybe\n", "verify must be true, false or a mapping"),
    ("- widen: {layer: a, width: 2}\n", "a recipe must be a YAML mapping"),
    ("steps:\n  - widen: {layer: a, width: [\n", "malformed YAML"),
    ("steps:\n  - widen: {layer: a, width: 2, width: 4}\n", "key 'width' is written twice in one mapping"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m[:40] for _, m in BAD])
def test_strict_validation(text, message):
    with pytest.raises(N2NError) as e:
        parse_recipe(text, source="r.yaml")
    assert str(e.value).startswith("r.yaml: ")
    assert message in str(e.value)


def test_valid_recipe_parses_to_steps():
    r = parse_recipe(
        "seed: 4\ndescription: demo\nsteps:\n"
        "  - widen: {layer: a, width: 8, split: random, noise: 0}\n"
        "  - deepen: {after: r, op: residual, hidden: 16, activation: none, name: blk, seed: 9}\n"
        "  - deepen: {after: r, activation: null}\n"
        "verify: {probes: 8, atol: 1.0e-4, rtol: 0, device: cpu}\n"
    )
    assert r.seed == 4 and r.description == "demo"
    assert [(s.kind, s.target) for s in r.steps] == [("widen", "a"), ("deepen", "r"), ("deepen", "r")]
    assert r.steps[0].args == {"layer": "a", "width": 8, "split": "random", "noise": 0.0}
    assert r.steps[1].args == {"after": "r", "op": "residual", "hidden": 16, "activation": "none", "name": "blk"}
    assert r.steps[1].seed == 9 and r.steps[0].seed is None
    assert r.steps[2].args == {"after": "r"}  # null means the default, as leaving it out does
    assert (r.verify.enabled, r.verify.probes, r.verify.atol, r.verify.rtol, r.verify.device) == (True, 8, 1e-4, 0.0, "cpu")
    assert parse_recipe("steps: [{deepen: {after: r}}]\nverify: false\n").verify.enabled is False


def test_bad_recipe_on_the_command_line_is_one_message_exit_2(runner, tmp_path):
    recipe = _write(tmp_path, "steps:\n  - widen: {layer: conv1, widht: 16}\n")
    result, out = _apply(runner, tmp_path, recipe)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {recipe}: step 1 (widen): unknown key 'widht' (did you mean 'width'?) (keys: layer, width, heads, kv_heads, head_dim, split, noise, seed)"
    assert not out.exists()
    missing, _ = _apply(runner, tmp_path, tmp_path / "nope.yaml")
    assert missing.exit_code == 2 and "nope.yaml: no such file" in missing.stderr


def test_json_and_stdout_checkpoint_conflict(runner, tmp_path):
    r = runner.invoke(app, ["apply", *example_paths("cnn")[:1], str(RECIPES / "cnn-wider-deeper.yaml"), "--arch",
                            example_paths("cnn")[1], "-o", "-", "--json"])
    assert r.exit_code == 2 and "--json and -o -" in r.stderr


def test_apply_recipe_does_not_modify_its_teacher():
    teacher = load_model(*example_paths("mlp"))
    before = {k: teacher.tensors.get(k).clone() for k in teacher.tensors.keys()}
    arch_before = teacher.arch.to_yaml()
    student, reports = apply_recipe(teacher, load_recipe(str(RECIPES / "mlp-wider-deeper.yaml")), device="cpu")
    assert teacher.history == [] and teacher.arch.to_yaml() == arch_before
    assert all(torch.equal(teacher.tensors.get(k), v) for k, v in before.items())
    assert len(reports) == 4 and reports[-1].end_to_end is not None and reports[-1].end_to_end.passed
    assert [r.kind for r in reports] == ["widen", "widen", "deepen", "deepen"]


def test_recipe_from_stdin(runner, tmp_path):
    ckpt, arch = example_paths("mlp")
    out = tmp_path / "o.safetensors"
    r = runner.invoke(app, ["apply", ckpt, "-", "--arch", arch, "-o", str(out)], input="steps:\n  - widen: {layer: fc1, width: 40}\n")
    assert r.exit_code == 0, r.output
    assert load_model(str(out)).history[-1]["recipe"]["file"] == "<stdin>"
    r = runner.invoke(app, ["apply", "-", "-", "-o", str(out)], input="")
    assert r.exit_code == 2 and "only one of CKPT and RECIPE can be '-'" in r.stderr


@pytest.mark.cuda
@requires_cuda
def test_apply_verifies_on_cuda(runner, tmp_path):
    result, out = _apply(runner, tmp_path, RECIPES / "resnet-sqrt2.yaml", teacher="resnet", extra=["--device", "cuda", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert all(s["verification"]["device"].startswith("cuda") for s in doc["steps"])
    assert all(s["verification"]["max_abs"] <= TOL for s in doc["steps"])
    assert doc["end_to_end"]["passed"] is True
    assert all(h["verification"]["device"] == "cuda" for h in load_model(str(out)).history)
