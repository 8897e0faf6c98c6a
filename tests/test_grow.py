"""`n2n grow`: plan, run and verify the steps to a target config; the result loads with
``from_pretrained`` into the target's class and computes the teacher's logits."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from n2nsurgery import grow  # noqa: E402
from n2nsurgery.cli import app  # noqa: E402
from test_hf_folders import assert_one_line_error, assert_same_function, config_of, extras_identical, load_hf, save_hf  # noqa: E402


def test_grow_intermediate_and_layers_in_one_command(tmp_path, runner):
    src = save_hf(tmp_path / "teacher", "llama-gqa-untied", sharded=True)
    out = tmp_path / "student"
    r = runner.invoke(app, ["grow", src, "--set", "intermediate_size=40", "--set", "num_hidden_layers=5", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    assert "grow plan" in r.stderr and "wrote" in r.stderr
    cfg = config_of(out)
    assert (cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["head_dim"]) == (40, 5, 4)
    assert_same_function(src, str(out))
    extras_identical(src, str(out))


def test_grow_to_a_target_config_loads_into_the_target_class(tmp_path, runner):
    src = save_hf(tmp_path / "teacher", "qwen2-biases", tie_word_embeddings=True)
    target = transformers.Qwen2Config.from_pretrained(src)
    target.intermediate_size, target.num_hidden_layers = 48, 4
    target.layer_types = None
    (tmp_path / "target").mkdir()
    target.save_pretrained(str(tmp_path / "target"))
    out = tmp_path / "student"
    r = runner.invoke(app, ["grow", src, "--to", str(tmp_path / "target" / "config.json"), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert [s["field"] for s in report["plan"]["steps"]] == ["intermediate_size", "num_hidden_layers"]
    assert all(s["verification"]["passed"] for s in report["steps"]) and report["end_to_end"]["passed"]
    assert report["end_to_end"]["max_abs"] < 1e-4
    student = transformers.Qwen2ForCausalLM.from_pretrained(str(out))
    assert student.config.intermediate_size == 48 and len(student.model.layers) == 4
    assert_same_function(src, str(out))


def test_grow_dry_run_prints_the_plan_and_writes_nothing(tmp_path, runner):
    src = save_hf(tmp_path / "teacher", "gpt2")
    r = runner.invoke(app, ["grow", src, "--set", "n_layer=4", "--dry-run", "--json"])
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)["plan"]
    assert plan["steps"] == [{"field": "n_layer", "from": 2, "to": 4, "available": True,
                              "step": {"deepen": {"after": ["transformer.h.0", "transformer.h.1"], "block": "copy"}}}]
    assert sorted(os.listdir(tmp_path)) == ["teacher"]


def test_grow_gpt2_layers(tmp_path, runner):
    src = save_hf(tmp_path / "teacher", "gpt2")
    out = tmp_path / "student"
    r = runner.invoke(app, ["grow", src, "--set", "n_layer=3", "--block", "zero", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    assert config_of(out)["n_layer"] == 3
    assert_same_function(src, str(out))


def test_more_new_blocks_than_old_ones_are_spread(tmp_path, runner):
    src = save_hf(tmp_path / "teacher", "llama-gqa-tied")
    out = tmp_path / "student"
    r = runner.invoke(app, ["grow", src, "--set", "num_hidden_layers=5", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    assert len(load_hf(str(out)).model.layers) == 5
    assert_same_function(src, str(out))


@pytest.mark.parametrize("sets, needles", [
    (["num_hidden_layers=1"], ["num_hidden_layers 1 is smaller"]),
    (["intermediate_size=8"], ["intermediate_size 8 is smaller"]),
    (["vocab_size=100"], ["cannot grow 'vocab_size'"]),
    (["num_hidden_layers=x"], ["num_hidden_layers must be a whole number"]),
    (["layers"], ["FIELD=VALUE"]),
    (["num_key_value_heads=3", "num_attention_heads=7"], ["num_attention_heads 7 is not a multiple of num_key_value_heads 3"]),
])
def test_unreachable_targets_are_refused_naming_the_field(tmp_path, runner, sets, needles):
    src = save_hf(tmp_path / "teacher", "llama-gqa-untied")
    args = ["grow", src, "-o", str(tmp_path / "out")]
    for s in sets:
        args += ["--set", s]
    assert_one_line_error(runner.invoke(app, args), *needles)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("field, value", [("hidden_size", 32), ("num_key_value_heads", 4), ("head_dim", 8)])
def test_each_llama_size_grows_alone_into_the_target_class(tmp_path, runner, field, value):
    """d_model (zero-padded through the RMSNorms), KV heads with their query groups, head_dim
    with rotary: each one `--set`, loaded with from_pretrained, the teacher's logits."""
    src = save_hf(tmp_path / "teacher", "llama-gqa-untied")
    out = tmp_path / "student"
    r = runner.invoke(app, ["grow", src, "--set", f"{field}={value}", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    assert config_of(out)[field] == value
    assert_same_function(src, str(out))


def test_kv_heads_bring_their_query_groups_and_fewer_heads_are_refused(tmp_path, runner):
    src = save_hf(tmp_path / "teacher", "llama-gqa-untied")
    cfg = config_of(src)
    group = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    kv = 2 * cfg["num_key_value_heads"]
    r = runner.invoke(app, ["grow", src, "--set", f"num_key_value_heads={kv}", "--dry-run", "--json"])
    assert r.exit_code == 0, r.stderr
    assert [s["field"] for s in json.loads(r.stdout)["plan"]["steps"]] == ["num_key_value_heads"]
    r = runner.invoke(app, ["grow", src, "--set", f"num_key_value_heads={kv}",
                            "--set", f"num_attention_heads={kv * (group - 1)}", "--dry-run"])
    assert_one_line_error(r, "num_attention_heads", "at least")


@pytest.mark.parametrize("field, value", [("n_embd", 64), ("n_head", 8)])
def test_gpt2_residual_stream_and_heads_are_refused_by_name(tmp_path, runner, field, value):
    src = save_hf(tmp_path / "teacher", "gpt2")
    r = runner.invoke(app, ["grow", src, "--set", f"{field}={value}", "--dry-run"])
    assert_one_line_error(r, f"growing {field}", "n_head × head_dim")


def test_gpt2_n_inner_grows(tmp_path, runner):
    src = save_hf(tmp_path / "teacher", "gpt2")
    out = tmp_path / "student"
    width = 2 * (config_of(src).get("n_inner") or 4 * config_of(src)["n_embd"])
    r = runner.invoke(app, ["grow", src, "--set", f"n_inner={width}", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    assert config_of(out)["n_inner"] == width
    assert_same_function(src, str(out))


def test_a_target_config_changing_a_fixed_field_is_refused(tmp_path, runner):
    src = save_hf(tmp_path / "teacher", "llama-gqa-untied")
    cfg = config_of(src)
    cfg.update(num_hidden_layers=3, vocab_size=99)
    (tmp_path / "target.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["grow", src, "--to", str(tmp_path / "target.json"), "--dry-run"])
    assert_one_line_error(r, "vocab_size", "cannot change")


def test_grow_needs_a_folder_and_a_target(tmp_path, runner):
    from conftest import RECIPES

    assert_one_line_error(runner.invoke(app, ["grow", str(RECIPES / "mlp.safetensors"), "--set", "n_layer=3", "--dry-run"]), "Hugging Face model folder")
    src = save_hf(tmp_path / "teacher", "gpt2")
    assert_one_line_error(runner.invoke(app, ["grow", src, "--dry-run"]), "--set", "--to")


def test_grow_everything_from_a_two_layer_llama(tmp_path, runner):
    src = save_hf(tmp_path / "teacher", "llama-gqa-untied")
    target = transformers.LlamaConfig.from_pretrained(src)
    target.hidden_size, target.intermediate_size, target.num_hidden_layers = 32, 48, 3
    target.num_attention_heads, target.num_key_value_heads = 8, 4
    target.head_dim = 4
    (tmp_path / "target").mkdir()
    target.save_pretrained(str(tmp_path / "target"))
    out = tmp_path / "student"
    r = runner.invoke(app, ["grow", src, "--to", str(tmp_path / "target" / "config.json"), "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    student = transformers.LlamaForCausalLM.from_pretrained(str(out))
    assert student.config.hidden_size == 32 and student.config.num_key_value_heads == 4
    assert_same_function(src, str(out))


def test_the_shipped_tiny_folder_grows_as_the_docs_say(tmp_path, runner):
    from conftest import RECIPES

    src = str(RECIPES / "llama-tiny-hf")
    out = tmp_path / "llama-tiny-grown"
    r = runner.invoke(app, ["grow", src, "--set", "intermediate_size=96", "--set", "num_hidden_layers=4", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    assert_same_function(src, str(out))
    assert (config_of(out)["intermediate_size"], config_of(out)["num_hidden_layers"]) == (96, 4)


def test_apply_a_recipe_to_a_folder_writes_a_folder(tmp_path, runner):
    from conftest import RECIPES

    src = str(RECIPES / "llama-tiny-hf")
    out = tmp_path / "grown"
    r = runner.invoke(app, ["apply", src, str(RECIPES / "llama-tiny-grow.yaml"), "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    assert (config_of(out)["intermediate_size"], config_of(out)["num_hidden_layers"]) == (128, 4)
    assert_same_function(src, str(out))
    r = runner.invoke(app, ["verify", src, str(out)])  # follows the recipe's renumbering
    assert r.exit_code == 0, r.stderr


def test_split_random_reaches_the_copied_units_and_stays_exact(tmp_path, runner):
    """--split random: the MLP's and the heads' copies share their outgoing weights in random
    proportions (so training can tell them apart); the residual stream is zero-padded as by
    default; the student is still the teacher's function and differs from the default's."""
    from safetensors.torch import load_file

    src = save_hf(tmp_path / "teacher", "llama-gqa-untied")
    sets = ["--set", "hidden_size=32", "--set", "num_key_value_heads=4", "--set", "intermediate_size=40"]
    r = runner.invoke(app, ["grow", src, *sets, "--split", "random", "--dry-run", "--json"])
    assert r.exit_code == 0, r.stderr
    steps = {s["field"]: s["step"]["widen"] for s in json.loads(r.stdout)["plan"]["steps"]}
    assert "split" not in steps["hidden_size"]  # no copies there: zero-padded whatever --split says
    assert steps["num_key_value_heads"]["split"] == steps["intermediate_size"]["split"] == "random"
    r = runner.invoke(app, ["grow", src, *sets, "--dry-run", "--json"])  # the default plan is unchanged
    assert all("split" not in s["step"]["widen"] for s in json.loads(r.stdout)["plan"]["steps"])

    for name, extra in (("equal", []), ("random", ["--split", "random"])):
        r = runner.invoke(app, ["grow", src, *sets, *extra, "-o", str(tmp_path / name)])
        assert r.exit_code == 0, r.stderr
        assert_same_function(src, str(tmp_path / name))
    equal, rand = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("equal", "random"))
    for key in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
        assert equal[key].shape == rand[key].shape and not torch.equal(equal[key], rand[key]), key
    assert torch.equal(equal["model.embed_tokens.weight"], rand["model.embed_tokens.weight"])


def test_split_reaches_the_api(tmp_path):
    from n2nsurgery.model import load_model

    teacher = load_model(save_hf(tmp_path / "teacher", "llama-gqa-untied"))
    plan = grow.plan_growth(teacher, {"intermediate_size": 40, "num_hidden_layers": 3}, split="random")
    assert [s.step for s in plan.steps] == [
        {"widen": {"layer": "model.layers.*.mlp.up_proj", "width": 40, "split": "random"}},
        {"deepen": {"after": ["model.layers.1"], "block": "copy"}},
    ]
    student, results, _ = grow.run_plan(teacher, plan, seed=3)
    assert all(r["verification"]["passed"] for r in results)
    assert {g["split"] for g in results[0]["report"]["groups"]} == {"random"}
