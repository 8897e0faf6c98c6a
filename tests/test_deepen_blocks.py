"""Deepening a transformer by a whole block (`n2n deepen --after BLOCK --block copy|zero`).

The oracle is Hugging Face itself: a teacher built with `transformers` from a tiny random config
(norm gains and biases moved off their init, norm eps 1e-2), deepened by n2n, must load into the
same class with `num_hidden_layers + 1` (strict: the renumbered keys are what it expects) and
give the teacher's logits. Also: renumbering, the rename map verification needs, refusals, the
CLI, `--op auto` on token sequences, and the shipped transformer recipes.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import RECIPES
from n2nsurgery import commit, load_model, model_from_state_dict
from n2nsurgery.blocks import block_names, deepen_block
from n2nsurgery.cli import app
from n2nsurgery.deepen import deepen, features_last
from n2nsurgery.errors import N2NError, VerificationFailed
from n2nsurgery.executor import run
from n2nsurgery.verify import verify

REL_TOL = 1e-5

LLAMA_SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   rms_norm_eps=1e-2)
CASES = {
    "llama-gqa-untied": ("LlamaConfig", "LlamaForCausalLM", dict(LLAMA_SMALL, num_key_value_heads=2), "num_hidden_layers"),
    "llama-gqa-tied": ("LlamaConfig", "LlamaForCausalLM", dict(LLAMA_SMALL, num_key_value_heads=1, tie_word_embeddings=True),
                       "num_hidden_layers"),
    "qwen2-qkv-biases": ("Qwen2Config", "Qwen2ForCausalLM", dict(LLAMA_SMALL, num_key_value_heads=2), "num_hidden_layers"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=97, n_positions=12, n_embd=32, n_layer=2, n_head=4, layer_norm_epsilon=1e-2), "n_layer"),
}
PREFIX = {"llama-gqa-untied": "model.layers.", "llama-gqa-tied": "model.layers.", "qwen2-qkv-biases": "model.layers.",
          "gpt2": "transformer.h."}


# ------------------------------------------------------------------------ helpers


def _hf(case: str, extra_layers: int = 0, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config_cls, model_cls, kwargs, layers_field = CASES[case]
    kwargs = dict(kwargs, **{layers_field: kwargs[layers_field] + extra_layers})
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(attn_implementation="eager", **kwargs)
    model = getattr(transformers, model_cls)(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norm gains and biases off 1 and 0, as after training
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return cfg, model


def _teacher(case: str):
    from n2nsurgery.hf_arch import arch_from_config

    cfg, hf = _hf(case)
    return cfg, hf, model_from_state_dict(arch_from_config(cfg.to_dict(), seq_len=10), hf.state_dict())


def _load_into_hf(case: str, student, extra_layers: int):
    _, hf = _hf(case, extra_layers=extra_layers, seed=1)  # different random weights: all must be replaced
    hf.load_state_dict(student.tensors.to_dict(), strict=True)
    return hf


def _max_rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def _logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


# ------------------------------------------------------------------------ the oracle


@pytest.mark.parametrize("mode", ["copy", "zero"])
@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("case", list(CASES))
def test_deepened_student_loads_into_hugging_face_with_one_more_layer(case, where, mode):
    cfg, hf_teacher, teacher = _teacher(case)
    blocks = block_names(teacher)
    assert blocks == [f"{PREFIX[case]}{i}" for i in range(2)]
    after = blocks[0] if where == "first" else blocks[-1]
    student, report = deepen_block(teacher, after, mode, seed=3)
    commit(teacher, student, renames=report.renames)  # n2n's own verification, intermediates included

    hf_student = _load_into_hf(case, student, extra_layers=1)  # strict: keys renumbered as HF expects
    ids = torch.randint(0, cfg.vocab_size, (5, 10), generator=torch.Generator().manual_seed(7))
    assert _max_rel(_logits(hf_student, ids), _logits(hf_teacher, ids)) <= REL_TOL
    (ours,) = run(student, {"input_ids": ids})
    assert _max_rel(ours, _logits(hf_teacher, ids)) <= REL_TOL

    new = report.new_block
    assert new == f"{PREFIX[case]}{int(after.rsplit('.', 1)[1]) + 1}"
    sd = student.tensors.to_dict()
    for w in report.writers:  # the writers are exactly zero, bias too
        assert torch.count_nonzero(sd[f"{w}.weight"]) == 0
        if f"{w}.bias" in sd:
            assert torch.count_nonzero(sd[f"{w}.bias"]) == 0
    if where == "first":  # the old block 1 lives on as block 2, tensor for tensor
        old_sd = teacher.tensors.to_dict()
        for key, value in old_sd.items():
            if key.startswith(f"{PREFIX[case]}1."):
                assert torch.equal(sd[key.replace(f"{PREFIX[case]}1.", f"{PREFIX[case]}2.", 1)], value)
        assert report.renumbered_blocks == [{"from": f"{PREFIX[case]}1", "to": f"{PREFIX[case]}2"}]
    else:
        assert report.renames == {}


@pytest.mark.parametrize("case", ["llama-gqa-untied", "gpt2"])
def test_copy_copies_the_block_before_and_zero_resets_norms_and_draws_readers(case):
    _, _, teacher = _teacher(case)
    prefix = PREFIX[case]
    copy, _ = deepen_block(teacher, f"{prefix}0", "copy")
    zero, rep = deepen_block(teacher, f"{prefix}0", "zero", seed=5)
    old, c, z = teacher.tensors.to_dict(), copy.tensors.to_dict(), zero.tensors.to_dict()
    writers = set(rep.writers)
    for key in old:
        if not key.startswith(f"{prefix}0."):
            continue
        new_key = f"{prefix}1." + key[len(f"{prefix}0."):]
        node = new_key.rsplit(".", 1)[0]
        if node in writers:
            assert torch.count_nonzero(c[new_key]) == 0 and torch.count_nonzero(z[new_key]) == 0
            continue
        assert torch.equal(c[new_key], old[key])
        if old[key].dim() == 1 and key.endswith("weight"):  # a norm's γ
            assert torch.equal(z[new_key], torch.ones_like(old[key]))
        elif key.endswith("bias"):
            assert torch.count_nonzero(z[new_key]) == 0
        else:  # a reader: fresh, not zero (so training can move it), and not the copy
            assert torch.count_nonzero(z[new_key]) == z[new_key].numel()
            assert not torch.equal(z[new_key], old[key])
    again, _ = deepen_block(teacher, f"{prefix}0", "zero", seed=5)
    assert all(torch.equal(v, again.tensors.get(k)) for k, v in z.items())  # same seed, same tensors


def test_unzeroed_writers_are_caught():
    """Negative control: the same copied block with its writers left as they were changes the
    function, and verification refuses it (so the tests above can fail)."""
    _, _, teacher = _teacher("llama-gqa-untied")
    student, report = deepen_block(teacher, "model.layers.0", "copy")
    live = {f"{w}.{role}": teacher.tensors.get(f"model.layers.0{w[len('model.layers.1'):]}.{role}")
            for w in report.writers for role in ("weight",)}
    bad = student.replace(tensors=student.tensors.with_changes(live))
    with pytest.raises(VerificationFailed):
        commit(teacher, bad, renames=report.renames)


def test_verification_needs_the_rename_map():
    """Renumbered nodes are compared with their originals through the rename map; without it the
    new block's nodes would be compared with the old block of the same number."""
    _, _, teacher = _teacher("llama-gqa-untied")
    student, report = deepen_block(teacher, "model.layers.0", "copy")
    with_map = verify(teacher, student, renames=report.renames)
    assert with_map.passed and with_map.intermediates.compared == 30 and with_map.intermediates.failed == 0
    without = verify(teacher, student)
    assert not without.passed and without.intermediates.failed > 0
    # no renames, no change: the default compares by name as before
    same = verify(teacher, teacher, renames=None)
    assert same.intermediates.compared == verify(teacher, teacher).intermediates.compared


def test_later_blocks_are_renumbered_from_the_last_down():
    teacher = load_model(str(RECIPES / "llama-tiny.safetensors"))
    student, r1 = deepen_block(teacher, "model.layers.1", "zero")  # 3 blocks
    student2, r2 = deepen_block(student, "model.layers.0", "copy")  # 4 blocks: 1 -> 2, 2 -> 3
    assert block_names(student2) == [f"model.layers.{i}" for i in range(4)]
    assert r2.renumbered_blocks == [{"from": "model.layers.1", "to": "model.layers.2"},
                                    {"from": "model.layers.2", "to": "model.layers.3"}]
    assert r2.renames["model.layers.2.mlp.down_proj"] == "model.layers.3.mlp.down_proj"
    assert student2.arch.node("model.norm").inputs == ["model.layers.3"]
    assert student2.arch.node("model.layers.1.input_layernorm").inputs == ["model.layers.0"]
    assert student2.arch.node("model.layers.2.input_layernorm").inputs == ["model.layers.1"]
    assert not any(k.startswith("model.layers.4") for k in student2.tensors.keys())
    assert verify(teacher, student2, renames=r2.renames).passed  # the teacher's block 1 is block 2 now
    assert student2.history[-1]["args"] == {"after": "model.layers.0", "block": "copy"}


def test_an_mlp_only_block_gets_an_mlp_only_block():
    """A block without attention (one residual add, one writer) is copied as it is."""
    from n2nsurgery.arch import parse_architecture

    yaml = """format: n2n-arch/1
inputs: {x: {shape: [4, 8], dtype: float32}}
nodes:
  - {name: stem, op: linear, in: x}
  - {name: blocks.0.norm, op: layernorm, in: stem, eps: 0.01}
  - {name: blocks.0.fc1, op: linear, in: blocks.0.norm}
  - {name: blocks.0.act, op: gelu, in: blocks.0.fc1}
  - {name: blocks.0.fc2, op: linear, in: blocks.0.act}
  - {name: blocks.0, op: add, in: [stem, blocks.0.fc2]}
  - {name: head, op: linear, in: blocks.0}
outputs: [head]
"""
    g = torch.Generator().manual_seed(0)
    t = {"stem.weight": torch.randn(8, 8, generator=g), "blocks.0.norm.weight": torch.rand(8, generator=g) + 0.5,
         "blocks.0.norm.bias": torch.randn(8, generator=g), "blocks.0.fc1.weight": torch.randn(16, 8, generator=g),
         "blocks.0.fc1.bias": torch.randn(16, generator=g), "blocks.0.fc2.weight": torch.randn(8, 16, generator=g),
         "blocks.0.fc2.bias": torch.randn(8, generator=g), "head.weight": torch.randn(3, 8, generator=g)}
    teacher = model_from_state_dict(parse_architecture(yaml), t)
    student, report = deepen(teacher, "blocks.0", block="zero")
    assert report.writers == ["blocks.1.fc2"]
    assert [n["name"] for n in report.nodes] == ["blocks.1.norm", "blocks.1.fc1", "blocks.1.act", "blocks.1.fc2", "blocks.1"]
    assert commit(teacher, student).verification.passed


# ------------------------------------------------------------------------ refusals


def test_after_that_is_not_a_block_names_the_blocks():
    teacher = load_model(str(RECIPES / "gpt2-tiny.safetensors"))
    for after, why in [("transformer.h.0.attn_residual", "is not a block output"),
                       ("transformer.h.0.mlp.c_proj", "is not a block output"),
                       ("transformer.h.9", "no node named"),
                       ("transformer.ln_f", "is not a block output")]:
        with pytest.raises(N2NError) as e:
            deepen_block(teacher, after, "copy")
        assert why in str(e.value) and "blocks in this model: transformer.h.0, transformer.h.1" in str(e.value)


def test_a_node_numbered_like_a_block_but_without_a_residual_stream_is_refused():
    from conftest import example_paths

    from n2nsurgery.arch import parse_architecture

    yaml = """format: n2n-arch/1
inputs: {x: {shape: [8], dtype: float32}}
nodes:
  - {name: fc.0, op: linear, in: x}
  - {name: fc.1, op: linear, in: fc.0}
outputs: [fc.1]
"""
    g = torch.Generator().manual_seed(0)
    teacher = model_from_state_dict(parse_architecture(yaml), {"fc.0.weight": torch.randn(8, 8, generator=g),
                                                               "fc.1.weight": torch.randn(4, 8, generator=g)})
    with pytest.raises(N2NError, match="not the output of a pre-norm residual block.*no pre-norm residual blocks"):
        deepen_block(teacher, "fc.0", "copy")
    cnn = load_model(*example_paths("cnn"))
    with pytest.raises(N2NError, match="'relu1' is not the output of a pre-norm residual block.*use --op instead"):
        deepen(cnn, "relu1", block="zero")


def test_cli_block_deepen_and_refusals(runner, tmp_path):
    out = tmp_path / "deeper.safetensors"
    ckpt = str(RECIPES / "llama-tiny.safetensors")
    r = runner.invoke(app, ["deepen", ckpt, "--after", "model.layers.0", "--block", "copy", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["op"] == "block" and report["new_block"] == "model.layers.1"
    assert report["verification"]["passed"] and report["verification"]["intermediates"]["failed"] == 0
    assert block_names(load_model(str(out))) == ["model.layers.0", "model.layers.1", "model.layers.2"]

    r = runner.invoke(app, ["deepen", ckpt, "--after", "model.layers.0.mlp", "--block", "zero", "--dry-run"])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [
        "error: no node named 'model.layers.0.mlp' to insert a block after; blocks in this model: model.layers.0, model.layers.1"]
    r = runner.invoke(app, ["deepen", ckpt, "--after", "model.layers.0", "--block", "zero", "--op", "linear", "--dry-run"])
    assert r.exit_code == 2 and "--op does not apply" in r.stderr and "Traceback" not in r.output
    r = runner.invoke(app, ["deepen", ckpt, "--after", "model.layers.0", "--block", "half", "--dry-run"])
    assert r.exit_code == 2


def test_same_seed_same_bytes(runner, tmp_path):
    ckpt = str(RECIPES / "gpt2-tiny.safetensors")
    outs = []
    for i in range(2):
        outs.append(tmp_path / f"o{i}.safetensors")
        r = runner.invoke(app, ["deepen", ckpt, "--after", "transformer.h.0", "--block", "zero", "--seed", "4", "-o", str(outs[-1])])
        assert r.exit_code == 0, r.output
    assert outs[0].read_bytes() == outs[1].read_bytes()


# ------------------------------------------------------------------------ --op auto on token sequences


def test_auto_inserts_a_linear_layer_over_the_features_of_a_token_sequence():
    """On [T, d] values auto picks linear over the last axis (a conv1d would treat the T
    positions as channels and mix them once trained); on a CNN's [C, H, W] it stays conv."""
    from conftest import example_paths

    teacher = load_model(str(RECIPES / "llama-tiny.safetensors"))
    for after in ("model.embed_tokens", "model.layers.0", "model.layers.0.self_attn", "model.layers.0.mlp.mul"):
        assert features_last(teacher, after)
        student, report = deepen(teacher, after)
        assert report.op == "linear"
        assert student.tensors.shape(f"{after}_deep.weight") == (teacher.shapes[after][-1],) * 2
    cnn = load_model(*example_paths("cnn"))
    assert not features_last(cnn, "relu1")
    assert deepen(cnn, "relu1")[1].op == "conv2d"


# ------------------------------------------------------------------------ shipped recipes


@pytest.mark.parametrize("name,layers", [("llama-tiny-grow.yaml", 4), ("gpt2-tiny-grow.yaml", 4)])
def test_shipped_transformer_recipes_verify(runner, tmp_path, name, layers):
    stem = name.replace("-grow.yaml", "")
    out = tmp_path / "grown.safetensors"
    r = runner.invoke(app, ["apply", str(RECIPES / f"{stem}.safetensors"), str(RECIPES / name), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    steps = report["steps"]
    assert all(s["verification"]["passed"] for s in steps)
    assert steps[-1]["end_to_end"]["passed"] and steps[-1]["end_to_end"]["intermediates"]["failed"] == 0
    teacher, student = load_model(str(RECIPES / f"{stem}.safetensors")), load_model(str(out))
    assert len(block_names(student)) == layers
    ids = torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(0))
    (want,), (got,) = run(teacher, {"input_ids": ids}), run(student, {"input_ids": ids})
    assert _max_rel(got, want) <= REL_TOL


def test_recipe_block_key_is_validated_and_renames_compose():
    from n2nsurgery.recipe import _compose_renames, apply_recipe, parse_recipe

    with pytest.raises(N2NError, match=r"step 1 \(deepen\): block must be one of copy, zero"):
        parse_recipe("steps:\n  - deepen: {after: model.layers.0, block: half}\n")
    teacher = load_model(str(RECIPES / "llama-tiny.safetensors"))
    recipe = parse_recipe("steps:\n  - deepen: {after: model.layers.0, block: copy}\n"
                          "  - deepen: {after: model.layers.0, block: zero}\n")
    student, reports = apply_recipe(teacher, recipe)  # teacher's block 1 is block 3 at the end
    assert block_names(student) == [f"model.layers.{i}" for i in range(4)]
    inner = reports[-1].end_to_end.intermediates
    assert reports[-1].end_to_end.passed and inner.failed == 0 and inner.compared == 30  # every teacher value
    assert _compose_renames({"a.1": "a.2"}, {"a.2": "a.3", "a.1": "a.2"}) == {"a.1": "a.3"}
