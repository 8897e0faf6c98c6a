"""Hugging Face model folders in and out (SPEC §6): the oracle is transformers itself.

Tiny random models are saved with ``save_pretrained`` (sharded and not, with a tokenizer-like
file beside them), grown through the CLI, loaded back with
``AutoModelForCausalLM.from_pretrained(OUT, output_loading_info=True)`` (no missing or
unexpected keys) and their logits compared with the teacher's (max relative |Δ| ≤ 1e-5 in
float32). Norm gains and biases are moved off 1 and 0 and the norm eps is large (1e-2), so a
misplaced eps or a forgotten bias shows.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from n2nsurgery.cli import app  # noqa: E402

transformers.logging.set_verbosity_error()

REL_TOL = 1e-5
SMALL = dict(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4)
CASES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=61, n_positions=16, n_embd=16, n_layer=2, n_head=2, layer_norm_epsilon=1e-2)),
    "llama-gqa-tied": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, num_key_value_heads=1, rms_norm_eps=1e-2, tie_word_embeddings=True)),
    "llama-gqa-untied": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, num_key_value_heads=2, rms_norm_eps=1e-2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(SMALL, num_key_value_heads=2, rms_norm_eps=1e-2, sliding_window=None)),
    "qwen2-biases": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, num_key_value_heads=2, rms_norm_eps=1e-2)),
}
TOKENIZER_BYTES = b'{"version": "1.0", "model": {"vocab": {"\\u00e9": 0}}}\n\x00\xff'


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def save_hf(folder, case: str, sharded: bool = False, dtype=None, **overrides) -> str:
    """A random model of `case` saved with save_pretrained into `folder`, with extra files."""
    config_cls, model_cls, kwargs = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    _perturb(model)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(folder), **({"max_shard_size": "8KB"} if sharded else {}))
    (folder / "tokenizer.json").write_bytes(TOKENIZER_BYTES)
    return str(folder)


def load_hf(folder: str, dtype=torch.float32):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, dtype=dtype)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def logits(folder: str, dtype=torch.float32) -> torch.Tensor:
    model = load_hf(folder, dtype)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (3, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits.float()


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def assert_same_function(teacher: str, student: str, tol: float = REL_TOL, dtype=torch.float32) -> None:
    err = rel_error(logits(teacher, dtype), logits(student, dtype))
    assert err <= tol, f"max relative |Δ| {err:.3g} > {tol:g}"


def assert_one_line_error(r, *needles) -> str:
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def config_of(folder) -> dict:
    return json.loads((open(os.path.join(folder, "config.json"))).read())


def extras_identical(teacher: str, student: str) -> None:
    for name in ("tokenizer.json", "generation_config.json"):
        if os.path.exists(os.path.join(teacher, name)):
            with open(os.path.join(teacher, name), "rb") as a, open(os.path.join(student, name), "rb") as b:
                assert a.read() == b.read(), name


def first_block(case: str) -> str:
    return "transformer.h.0" if case == "gpt2" else "model.layers.0"


# ---------------------------------------------------------------------------------- deepen


@pytest.mark.parametrize("case", list(CASES))
def test_deepen_block_after_first_gives_a_folder_that_from_pretrained_loads_exactly(tmp_path, runner, case):
    src = save_hf(tmp_path / "teacher", case, sharded=case == "qwen2-biases")
    out = tmp_path / "student"
    r = runner.invoke(app, ["deepen", src, "--after", first_block(case), "--block", "copy", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    cfg = config_of(out)
    assert cfg.get("num_hidden_layers", cfg.get("n_layer")) == 3
    assert cfg.get("n_inner", 64) == 64 and cfg.get("head_dim", 4) == 4  # pinned: GPT-2's null n_inner, Llama's derived head_dim
    if case == "qwen2-biases":
        assert cfg["layer_types"] == ["full_attention"] * 3
        assert os.path.exists(out / "model.safetensors.index.json")  # the input's layout
    else:
        assert os.path.exists(out / "model.safetensors") and not os.path.exists(out / "model.safetensors.index.json")
    assert_same_function(src, str(out))
    extras_identical(src, str(out))


def test_deepen_every_block_llama_pro_pattern(tmp_path, runner):
    src = save_hf(tmp_path / "teacher", "llama-gqa-untied", sharded=True)
    out = tmp_path / "student"
    r = runner.invoke(app, ["deepen", src, "--every", "1", "--block", "zero", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["new_blocks"] == 2 and report["verification"]["passed"]
    assert config_of(out)["num_hidden_layers"] == 4
    student = load_hf(str(out))
    # LLaMA-Pro: the new blocks are 1 and 3, their writers zero; the teacher's layer 1 is now 2
    assert float(student.model.layers[1].mlp.down_proj.weight.detach().abs().max()) == 0
    assert float(student.model.layers[3].self_attn.o_proj.weight.detach().abs().max()) == 0
    teacher = load_hf(src)
    assert torch.equal(student.model.layers[2].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)
    assert_same_function(src, str(out))
    extras_identical(src, str(out))


def test_deepen_every_needs_block_and_not_after(tmp_path, runner):
    src = save_hf(tmp_path / "teacher", "llama-gqa-tied")
    assert_one_line_error(runner.invoke(app, ["deepen", src, "--every", "1", "--dry-run"]), "--block")
    assert_one_line_error(runner.invoke(app, ["deepen", src, "--every", "1", "--after", "model.layers.0", "--block", "copy", "--dry-run"]), "not both")
    assert_one_line_error(runner.invoke(app, ["deepen", src, "--every", "3", "--block", "copy", "--dry-run"]), "only 2 blocks")


def test_bfloat16_folder_deepened_and_widened_at_bfloat16_tolerance(tmp_path, runner):
    src = save_hf(tmp_path / "teacher", "llama-gqa-untied", dtype=torch.bfloat16)
    out = tmp_path / "student"
    r = runner.invoke(app, ["deepen", src, "--after", "model.layers.1", "--block", "copy", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    assert config_of(out)["dtype"] == "bfloat16"
    assert_same_function(src, str(out), tol=1e-2, dtype=torch.bfloat16)
    wide = tmp_path / "wide"
    r = runner.invoke(app, ["widen", src, "--layer", "model.layers.*.mlp.up_proj", "--width", "32", "-o", str(wide)])
    assert r.exit_code == 0, r.stderr
    assert_same_function(src, str(wide), tol=2e-2, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------- widen


@pytest.mark.parametrize("case", ["llama-gqa-tied", "qwen2-biases", "mistral"])
def test_widen_every_mlp_with_a_glob_pins_intermediate_size(tmp_path, runner, case):
    src = save_hf(tmp_path / "teacher", case)
    out = tmp_path / "student"
    r = runner.invoke(app, ["widen", src, "--layer", "model.layers.*.mlp.up_proj", "--width", "40", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    assert config_of(out)["intermediate_size"] == 40
    assert_same_function(src, str(out))
    extras_identical(src, str(out))
    # n2n reads its own output back: inspect and verify work on the folders
    r = runner.invoke(app, ["verify", src, str(out)])
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0, r.stderr
    assert "intermediate_size 40" in r.stderr and "n2n.history" in r.stderr


def test_one_layer_wider_is_refused_for_a_folder_and_written_with_format_n2n(tmp_path, runner):
    src = save_hf(tmp_path / "teacher", "llama-gqa-untied")
    out = tmp_path / "student"
    r = runner.invoke(app, ["widen", src, "--layer", "model.layers.0.mlp.up_proj", "--width", "40", "-o", str(out)])
    assert_one_line_error(r, "model.layers.0.mlp.up_proj", "model.layers.*.mlp.up_proj", "--format n2n")
    assert not os.path.exists(out)
    n2n_out = tmp_path / "student.safetensors"
    r = runner.invoke(app, ["widen", src, "--layer", "model.layers.0.mlp.up_proj", "--width", "40", "-o", str(n2n_out), "--format", "n2n"])
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["verify", src, str(n2n_out)])
    assert r.exit_code == 0, r.stderr


def test_a_layer_no_hf_class_has_is_refused_for_a_folder(tmp_path, runner):
    src = save_hf(tmp_path / "teacher", "llama-gqa-tied")
    r = runner.invoke(app, ["deepen", src, "--after", "model.layers.0.mlp.down_proj", "-o", str(tmp_path / "out")])
    assert_one_line_error(r, "--format n2n")


# ---------------------------------------------------------------------------------- layout, safety


def test_max_shard_size_shards_an_unsharded_folder(tmp_path, runner):
    src = save_hf(tmp_path / "teacher", "llama-gqa-tied")
    out = tmp_path / "student"
    r = runner.invoke(app, ["deepen", src, "--after", "model.layers.0", "--block", "copy", "-o", str(out), "--max-shard-size", "10KB"])
    assert r.exit_code == 0, r.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "n2n.arch" in index["metadata"]
    assert_same_function(src, str(out))


def test_rewriting_the_same_output_folder_replaces_it(tmp_path, runner):
    src = save_hf(tmp_path / "teacher", "llama-gqa-tied")
    out = tmp_path / "student"
    for width in ("32", "40"):
        r = runner.invoke(app, ["widen", src, "--layer", "model.layers.*.mlp.up_proj", "--width", width, "-o", str(out)])
        assert r.exit_code == 0, r.stderr
    assert config_of(out)["intermediate_size"] == 40
    assert sorted(os.listdir(tmp_path)) == ["student", "teacher"]  # no temporary folders left


def test_output_folder_of_other_things_and_the_input_folder_are_refused(tmp_path, runner):
    src = save_hf(tmp_path / "teacher", "llama-gqa-tied")
    args = ["widen", src, "--layer", "model.layers.*.mlp.up_proj", "--width", "32"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert_one_line_error(runner.invoke(app, args + ["-o", str(busy)]), "not a model folder")
    (busy / "config.json").write_text("{}")  # a model folder, but with the user's notes in it
    assert_one_line_error(runner.invoke(app, args + ["-o", str(busy)]), "'notes.txt'")
    (busy / "notes.txt").unlink()
    (busy / "sub").mkdir()
    assert_one_line_error(runner.invoke(app, args + ["-o", str(busy)]), "'sub'")
    assert sorted(os.listdir(busy)) == ["config.json", "sub"]
    before = {n: (tmp_path / "teacher" / n).read_bytes() for n in os.listdir(src)}
    assert_one_line_error(runner.invoke(app, args + ["-o", src]), "--overwrite-input")
    assert {n: (tmp_path / "teacher" / n).read_bytes() for n in os.listdir(src)} == before


def test_format_hf_needs_a_folder_input(runner, tmp_path):
    from conftest import RECIPES

    r = runner.invoke(app, ["widen", str(RECIPES / "mlp.safetensors"), "--arch", str(RECIPES / "mlp.yaml"), "--layer", "fc1",
                            "--width", "40", "-o", str(tmp_path / "o"), "--format", "hf"])
    assert_one_line_error(r, "--format hf")


def test_inspect_shows_the_config_summary_first(tmp_path, runner):
    src = save_hf(tmp_path / "teacher", "qwen2-biases", sharded=True, tie_word_embeddings=True)
    r = runner.invoke(app, ["inspect", src])
    assert r.exit_code == 0, r.stderr
    first, second = r.stderr.splitlines()[:2]
    assert first.startswith("qwen2 (Qwen2ForCausalLM)") and "hidden_size 16" in first and "num_key_value_heads 2" in first
    assert "tied to the embedding" in second and "sharded" in second
    r = runner.invoke(app, ["inspect", src, "--json"])
    info = json.loads(r.stdout)["hf"]
    assert info["tied"] is True and info["family"] == "qwen2"


def test_verify_a_deepened_folder_follows_the_renumbering_in_its_history(tmp_path, runner):
    src = save_hf(tmp_path / "teacher", "gpt2", n_layer=3)
    out = tmp_path / "student"
    r = runner.invoke(app, ["deepen", src, "--every", "1", "--block", "zero", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["verify", src, str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    inside = json.loads(r.stdout)["intermediates"]
    assert inside["failed"] == 0 and inside["compared"] > 30  # the renumbered blocks too, each with its original


# ---------------------------------------------------------------------------------- refusals


def _edit_config(folder: str, **changes) -> None:
    path = os.path.join(folder, "config.json")
    cfg = json.loads(open(path).read())
    cfg.update(changes)
    open(path, "w").write(json.dumps(cfg))


@pytest.mark.parametrize("changes, needles", [
    ({"model_type": "bert"}, ["model_type 'bert'", "gpt2, llama, mistral, qwen2"]),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, ["rope_scaling"]),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}}, ["rope_type 'yarn'"]),
    ({"use_qk_norm": True}, ["use_qk_norm"]),
    ({"model_type": "mistral", "sliding_window": 4}, ["sliding_window 4", "sequence length 8"]),
])
def test_unsupported_config_features_are_refused_in_every_command(tmp_path, runner, changes, needles):
    src = save_hf(tmp_path / "teacher", "llama-gqa-tied")
    _edit_config(src, **changes)
    for args in (["inspect", src], ["deepen", src, "--after", "model.layers.0", "--block", "copy", "--dry-run"],
                 ["grow", src, "--set", "intermediate_size=32", "--dry-run"], ["verify", src, src]):
        assert_one_line_error(runner.invoke(app, args), *needles)


def test_gpt2_scale_attn_by_inverse_layer_idx_is_refused(tmp_path, runner):
    src = save_hf(tmp_path / "teacher", "gpt2", scale_attn_by_inverse_layer_idx=True)
    r = runner.invoke(app, ["deepen", src, "--after", "transformer.h.0", "--block", "copy", "-o", str(tmp_path / "o")])
    assert_one_line_error(r, "scale_attn_by_inverse_layer_idx")


def test_seq_len_beyond_the_sliding_window_is_refused_and_within_it_accepted(tmp_path, runner):
    src = save_hf(tmp_path / "teacher", "mistral", sliding_window=6)
    r = runner.invoke(app, ["deepen", src, "--after", "model.layers.0", "--block", "copy", "--dry-run"])
    assert_one_line_error(r, "sliding_window 6")
    out = tmp_path / "student"
    r = runner.invoke(app, ["deepen", src, "--after", "model.layers.0", "--block", "copy", "--seq-len", "6", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    assert config_of(out)["sliding_window"] == 6


def test_arch_still_wins_over_config_json(tmp_path, runner):
    from n2nsurgery.hf_arch import arch_yaml_from_config

    src = save_hf(tmp_path / "teacher", "llama-gqa-tied")
    (tmp_path / "short.yaml").write_text(arch_yaml_from_config(config_of(src), seq_len=3))
    r = runner.invoke(app, ["inspect", src, "--arch", str(tmp_path / "short.yaml"), "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["inputs"]["input_ids"]["shape"] == [3]


def test_python_api_reads_and_writes_folders(tmp_path):
    import n2nsurgery as n2n
    from n2nsurgery.blocks import deepen_blocks, every_kth_block

    src = save_hf(tmp_path / "teacher", "mistral")
    teacher = n2n.load_model(src)
    assert teacher.hf is not None and teacher.arch.inputs["input_ids"].shape == (8,)
    student, report = deepen_blocks(teacher, every_kth_block(teacher, 2), "copy")
    assert report.renames == {}  # after the last block: nothing renumbered
    done = n2n.commit(teacher, student, str(tmp_path / "student"))
    assert done.verification.passed and config_of(tmp_path / "student")["num_hidden_layers"] == 3
    assert_same_function(src, str(tmp_path / "student"))


def test_seq_len_is_refused_for_an_n2n_checkpoint(runner):
    from conftest import RECIPES

    r = runner.invoke(app, ["deepen", str(RECIPES / "llama-tiny.safetensors"), "--after", "model.layers.0", "--block", "copy",
                            "--seq-len", "4", "--dry-run"])
    assert_one_line_error(r, "--seq-len applies to a Hugging Face model folder")
