"""Several layers in one widening step: `--layer` repeated or a glob, each match its own group,
all to the same width, verified once together.

Oracle: Hugging Face itself. Every layer's MLP widened with a glob must load into the same class
with the bigger `intermediate_size` (strict) and give the teacher's logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import RECIPES, example_paths
from n2nsurgery import commit, load_model, model_from_state_dict
from n2nsurgery.cli import app
from n2nsurgery.errors import N2NError
from n2nsurgery.executor import run
from n2nsurgery.ops import get_op
from n2nsurgery.recipe import apply_recipe, parse_recipe
from n2nsurgery.widen import expand_layers, widen, widen_many

REL_TOL = 1e-5
LLAMA = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-2)
CASES = {
    "llama-gqa-untied": ("LlamaConfig", "LlamaForCausalLM", LLAMA, "intermediate_size", "model.layers.*.mlp.up_proj"),
    "llama-gqa-tied": ("LlamaConfig", "LlamaForCausalLM", dict(LLAMA, num_key_value_heads=1, tie_word_embeddings=True),
                       "intermediate_size", "model.layers.*.mlp.up_proj"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", LLAMA, "intermediate_size", "model.layers.*.mlp.gate_proj"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=97, n_positions=12, n_embd=32, n_layer=2, n_head=4, n_inner=48, layer_norm_epsilon=1e-2),
             "n_inner", "transformer.h.*.mlp.c_fc"),
}


def _hf(case: str, seed: int = 0, **changes):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config_cls, model_cls, kwargs, _, _ = CASES[case]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(attn_implementation="sdpa", **dict(kwargs, **changes))
    model = getattr(transformers, model_cls)(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norm gains and biases off their init values, as after training
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return cfg, model


def _max_rel(ours, ref) -> float:
    assert ours.shape == ref.shape
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


@pytest.mark.parametrize("split", ["equal", "random"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_mlp_widened_with_a_glob_loads_into_hugging_face(case, split):
    from n2nsurgery.hf_arch import arch_from_config

    if case == "gpt2" and get_op("linear_t").units is None:
        pytest.skip("GPT-2's MLP is linear_t, which has no widening rule in this build")
    _, _, _, size_field, glob = CASES[case]
    cfg, hf = _hf(case)
    teacher = model_from_state_dict(arch_from_config(cfg.to_dict(), seq_len=10), hf.state_dict())
    student, report = widen_many(teacher, [glob], 77, split=split, seed=2)
    assert len(report.groups) == 2 and [g.new_width for g in report.groups] == [77, 77]
    assert report.groups[0].group != report.groups[1].group  # each layer its own group
    commit(teacher, student)

    _, hf_student = _hf(case, seed=1, **{size_field: 77})
    hf_student.load_state_dict(student.tensors.to_dict(), strict=True)
    ids = torch.randint(0, cfg.vocab_size, (5, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert _max_rel(hf_student(ids).logits, hf(ids).logits) <= REL_TOL


# ------------------------------------------------------------------------ matching


def test_globs_and_names_expand_in_graph_order_each_once():
    m = load_model(str(RECIPES / "llama-tiny.safetensors"))
    got = expand_layers(m, ["model.layers.1.mlp.up_proj", "model.layers.*.mlp.up_proj", "model.layers.?.mlp.gate_proj"])
    assert got == ["model.layers.1.mlp.up_proj", "model.layers.0.mlp.up_proj",
                   "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"]


def test_a_glob_matching_nothing_names_the_glob_and_close_names():
    m = load_model(str(RECIPES / "llama-tiny.safetensors"))
    with pytest.raises(N2NError) as e:
        widen_many(m, ["model.layers.*.mlp.upproj"], 96)
    assert str(e.value).startswith("--layer 'model.layers.*.mlp.upproj' matches no node")
    assert "close names: model.layers.*.mlp.up_proj" in str(e.value)
    with pytest.raises(N2NError, match=r"matches 2 node\(s\).*none is a layer with units"):
        widen_many(m, ["model.layers.*.mlp.act_fn"], 96)


def test_two_matches_in_one_coupled_group_widen_it_once():
    """gate_proj and up_proj of one SwiGLU MLP are one group (through the mul): widened once,
    the second listed as widened with the first."""
    m = load_model(str(RECIPES / "llama-tiny.safetensors"))
    student, report = widen_many(m, ["model.layers.*.mlp.up_proj", "model.layers.*.mlp.gate_proj"], 96)
    assert [g.layer for g in report.groups] == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert report.skipped == [
        {"layer": "model.layers.0.mlp.gate_proj", "widened_with": "model.layers.0.mlp.up_proj"},
        {"layer": "model.layers.1.mlp.gate_proj", "widened_with": "model.layers.1.mlp.up_proj"},
    ]
    assert student.tensors.shape("model.layers.1.mlp.gate_proj.weight") == (96, 32)
    assert commit(m, student).verification.passed
    assert len(student.history) == len(m.history) + 1  # one step
    assert student.history[-1]["args"]["layer"] == ["model.layers.*.mlp.up_proj", "model.layers.*.mlp.gate_proj"]


def test_one_layer_through_widen_many_is_widen():
    m = load_model(*example_paths("mlp"))
    a, _ = widen(m, "fc1", 48, seed=5)
    b, _ = widen_many(m, ["fc1"], 48, seed=5)
    assert sorted(a.tensors.keys()) == sorted(b.tensors.keys())
    assert all(torch.equal(a.tensors.get(k), b.tensors.get(k)) for k in a.tensors.keys())


def test_noise_over_several_groups_is_measured_against_the_noise_free_twin():
    m = load_model(str(RECIPES / "llama-tiny.safetensors"))
    student, report = widen_many(m, ["model.layers.*.mlp.up_proj"], 96, noise=0.05)
    assert report.noise_free is not None
    done = commit(m, student, noise_free=report.noise_free)
    assert done.verification.passed and done.noise_deviation["max_abs"] > 0


# ------------------------------------------------------------------------ CLI and recipes


def test_repeated_layer_widens_every_one(runner, tmp_path):
    """Regression: a repeated --layer used to widen only the last one, silently."""
    ckpt, arch = example_paths("cnn")
    out = tmp_path / "w.safetensors"
    r = runner.invoke(app, ["widen", ckpt, "--arch", arch, "--layer", "conv1", "--layer", "conv2", "--width", "40",
                            "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert [g["layer"] for g in report["groups"]] == ["conv1", "conv2"]
    student = load_model(str(out))
    assert student.tensors.shape("conv1.weight")[0] == 40 and student.tensors.shape("conv2.weight")[0] == 40
    assert report["verification"]["passed"]


def test_one_layer_cli_report_is_unchanged(runner, tmp_path):
    ckpt, arch = example_paths("mlp")
    r = runner.invoke(app, ["widen", ckpt, "--arch", arch, "--layer", "fc1", "--width", "48", "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["layer"] == "fc1"


def test_cli_glob_matching_nothing_is_one_error_line(runner):
    r = runner.invoke(app, ["widen", str(RECIPES / "llama-tiny.safetensors"), "--layer", "model.layers.*.mlp.upproj",
                            "--width", "96", "--dry-run"])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --layer 'model.layers.*.mlp.upproj' matches no node")


def test_cli_glob_widens_each_mlp_and_prints_each_group(runner):
    r = runner.invoke(app, ["widen", str(RECIPES / "llama-tiny.safetensors"), "--layer", "model.layers.*.mlp.up_proj",
                            "--width", "96", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "widened 2 coupled group(s) to 96 units" in r.stderr
    assert "model.layers.0.mlp.up_proj 64 → 96" in r.stderr and "model.layers.1.mlp.up_proj 64 → 96" in r.stderr


def test_recipe_layer_may_be_a_list_or_a_glob():
    m = load_model(str(RECIPES / "llama-tiny.safetensors"))
    recipe = parse_recipe("steps:\n  - widen: {layer: ['model.layers.0.mlp.up_proj', 'model.layers.1.mlp.gate_proj'], width: 80}\n"
                          "  - widen: {layer: 'model.layers.*.mlp.up_proj', width: 96}\n")
    student, reports = apply_recipe(m, recipe)
    assert student.tensors.shape("model.layers.1.mlp.up_proj.weight") == (96, 32)
    assert reports[0].target == "model.layers.0.mlp.up_proj, model.layers.1.mlp.gate_proj"
    with pytest.raises(N2NError, match="layer must be a node name, a glob"):
        parse_recipe("steps:\n  - widen: {layer: [], width: 80}\n")
    ids = torch.randint(0, 96, (3, 8), generator=torch.Generator().manual_seed(0))
    (want,), (got,) = run(m, {"input_ids": ids}), run(student, {"input_ids": ids})
    assert _max_rel(got, want) <= REL_TOL
