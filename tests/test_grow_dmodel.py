"""Growing d_model (the residual stream) and transformer MLPs, checked against Hugging Face itself.

The oracle is the real thing: a teacher built by ``transformers`` from a tiny config (random init,
norm gains and biases moved off 1 and 0, norm eps 1e-2 so that a forgotten eps × n/q shows), made
into an n2n model with ``hf_arch``, grown with ``n2nsurgery.widen.widen``; then the SAME HF class
with the bigger config loads the student's tensors (``strict=True``) and must give the teacher's
logits (max relative |Δ| ≤ 1e-5, float32). GPT-2 cannot load a wider d_model into HF without more
heads (n_embd = heads × head_dim), so its stream is checked through n2n's executor against the
teacher's HF logits. Negative controls remove one ingredient each and must be caught.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import RECIPES  # noqa: E402
from n2nsurgery import model_from_state_dict  # noqa: E402
from n2nsurgery.cli import app  # noqa: E402
from n2nsurgery.errors import N2NError  # noqa: E402
from n2nsurgery.executor import run  # noqa: E402
from n2nsurgery.hf_arch import arch_from_config  # noqa: E402
from n2nsurgery.ops import base as ops_base  # noqa: E402
from n2nsurgery.ops import norms  # noqa: E402
from n2nsurgery.widen import widen, widen_group  # noqa: E402

transformers.logging.set_verbosity_error()

REL_TOL = 1e-5
SEQ = 8
EPS = 1e-2
SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, head_dim=8, rms_norm_eps=EPS)

LLAMA_FAMILY = {
    "llama-gqa-untied": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, num_key_value_heads=2)),
    "llama-gqa-tied": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-qkv-biases": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(SMALL, num_key_value_heads=1, sliding_window=None)),
}
GPT2 = {
    "gpt2-tied": dict(vocab_size=97, n_positions=12, n_embd=32, n_layer=2, n_head=4, layer_norm_epsilon=EPS),
    "gpt2-untied": dict(vocab_size=97, n_positions=12, n_embd=32, n_layer=2, n_head=4, layer_norm_epsilon=EPS, tie_word_embeddings=False),
}


# ------------------------------------------------------------------------------ helpers


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Norm gains off 1 and biases off 0, as after training (init values would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def _hf(config_cls: str, model_cls: str, kwargs: dict, seed: int = 0):
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(attn_implementation="eager", **kwargs)
    model = getattr(transformers, model_cls)(cfg).eval()
    _perturb(model, seed)
    return cfg, model


def _teacher(config_cls: str, model_cls: str, kwargs: dict):
    """(HF teacher, its n2n model). A tied head's second name is left out, as save_pretrained does."""
    cfg, hf = _hf(config_cls, model_cls, kwargs)
    sd = {k: v for k, v in hf.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    model = model_from_state_dict(arch_from_config(cfg.to_dict(), seq_len=SEQ), sd)
    return hf, model


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (5, SEQ), generator=torch.Generator().manual_seed(1))


def _logits(hf, ids) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids).logits


def _max_rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def _student_tensors(student) -> dict:
    sd = student.tensors.to_dict()
    return {k: v.clone() for k, v in sd.items()}


def _load_hf(config_cls: str, model_cls: str, kwargs: dict, tensors: dict):
    """The HF class of the bigger config, loading the student's tensors with strict=True."""
    cfg = getattr(transformers, config_cls)(attn_implementation="eager", **kwargs)
    hf = getattr(transformers, model_cls)(cfg).eval()
    sd = dict(tensors)
    if cfg.tie_word_embeddings:  # one tensor in the student; HF's state_dict names it twice
        assert "lm_head.weight" not in sd
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    hf.load_state_dict(sd, strict=True)
    return hf


def _grown_config(kwargs: dict, width: int, eps_factor: float) -> dict:
    return dict(kwargs, hidden_size=width, rms_norm_eps=kwargs["rms_norm_eps"] * eps_factor)


def _llama_rel(case: str, width: int, split, *, tamper=None, eps_factor=None) -> tuple:
    """Grow a Llama-family teacher's d_model and compare the HF student with the teacher."""
    config_cls, model_cls, kwargs = LLAMA_FAMILY[case]
    hf, teacher = _teacher(config_cls, model_cls, kwargs)
    student, report = widen(teacher, "model.embed_tokens", width, split=split, seed=3)
    tensors = _student_tensors(student)
    if tamper is not None:
        tamper(tensors, report)
    n = kwargs["hidden_size"]
    if eps_factor is None:
        eps_factor = 1.0 if report.fill == "tile" else n / width
    big = _load_hf(config_cls, model_cls, _grown_config(kwargs, width, eps_factor), tensors)
    ids = _ids(kwargs["vocab_size"])
    return _max_rel(_logits(big, ids), _logits(hf, ids)), report, student


def _gpt2_rel(case: str, width: int, split, layer: str = "transformer.wte") -> tuple:
    """Grow GPT-2 and run the student in n2n's executor against the HF teacher's logits."""
    hf, teacher = _teacher("GPT2Config", "GPT2LMHeadModel", GPT2[case])
    student, report = widen(teacher, layer, width, split=split, seed=3)
    ids = _ids(GPT2[case]["vocab_size"])
    (ours,) = run(student, {"input_ids": ids})
    return _max_rel(ours, _logits(hf, ids)), report, student


# ------------------------------------------------------------------------------ d_model: Llama family


@pytest.mark.parametrize("case", list(LLAMA_FAMILY))
@pytest.mark.parametrize("width", [40, 64])
def test_zero_padding_the_stream_loads_into_the_bigger_hf_model(case, width):
    rel, report, _ = _llama_rel(case, width, "zero")
    assert report.fill == "zero" and rel <= REL_TOL


@pytest.mark.parametrize("case", ["llama-gqa-untied", "llama-gqa-tied", "mistral"])
def test_tiling_the_stream_loads_into_the_bigger_hf_model(case):
    rel, report, _ = _llama_rel(case, 64, "tile")
    assert report.fill == "tile" and rel <= REL_TOL
    assert report.attr_changes == {}  # tile keeps eps


def test_the_default_through_rmsnorm_is_zero_even_at_a_multiple():
    rel, report, _ = _llama_rel("llama-gqa-untied", 64, None)
    assert (report.fill, report.split) == ("zero", "zero") and rel <= REL_TOL
    assert report.to_dict()["fill"] == "zero"


def test_the_tied_head_stays_one_tensor_and_tile_divides_the_final_norm():
    rel, report, student = _llama_rel("llama-gqa-tied", 64, "tile")
    assert rel <= REL_TOL
    assert "lm_head.weight" not in student.tensors and student.arch.node("lm_head").param_key("weight") == "model.embed_tokens.weight"
    _, teacher = _teacher(*LLAMA_FAMILY["llama-gqa-tied"])
    old = teacher.tensors.get("model.norm.weight")
    assert torch.allclose(student.tensors.get("model.norm.weight"), old.repeat(2) / 2)
    assert torch.equal(student.tensors.get("model.embed_tokens.weight"), teacher.tensors.get("model.embed_tokens.weight").repeat(1, 2))


def test_zero_padding_keeps_new_coordinates_zero_and_rescales_gamma():
    _, report, student = _llama_rel("llama-gqa-untied", 48, "zero")
    _, teacher = _teacher(*LLAMA_FAMILY["llama-gqa-untied"])
    emb = student.tensors.get("model.embed_tokens.weight")
    assert torch.equal(emb[:, 32:], torch.zeros(97, 16)) and torch.equal(emb[:, :32], teacher.tensors.get("model.embed_tokens.weight"))
    for writer in ("model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert torch.equal(student.tensors.get(writer)[32:], torch.zeros(16, student.tensors.get(writer).shape[1]))
    gamma = student.tensors.get("model.norm.weight")
    assert torch.allclose(gamma[:32], teacher.tensors.get("model.norm.weight") * math.sqrt(32 / 48))
    assert torch.equal(gamma[32:], torch.ones(16))
    assert student.arch.node("model.norm").resolved_attrs()["eps"] == pytest.approx(EPS * 32 / 48)


READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")


def _new_coordinate_grads(hf, ids, n: int, steps: int = 2) -> dict:
    """The largest gradient on the new coordinates of each kind of tensor, over `steps` SGD steps
    of the language-model loss: at step 0 only the writers' new rows can move (the readers' new
    columns read zeros), from step 1 on the new coordinates carry values and everything can."""
    best = {"writers' new rows": 0.0, "embedding's new columns": 0.0, "readers' new columns": 0.0}
    opt = torch.optim.SGD(hf.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        hf(ids, labels=ids).loss.backward()
        layers = hf.model.layers
        for k, g in {
            "writers' new rows": max(float(l.self_attn.o_proj.weight.grad[n:].abs().max()) for l in layers),
            "embedding's new columns": float(hf.model.embed_tokens.weight.grad[:, n:].abs().max()),
            "readers' new columns": max(float(l.get_submodule(r).weight.grad[:, n:].abs().max()) for l in layers for r in READERS),
        }.items():
            best[k] = max(best[k], g)
        opt.step()
    return best


@pytest.mark.parametrize("case", ["llama-gqa-untied", "llama-gqa-tied"])
def test_zero_padding_draws_the_readers_new_columns_so_training_can_use_them(case):
    """Zero readers' columns behind zero writers' rows are a saddle: every new coordinate gets
    exactly zero gradient forever (benchmarks/grow_lm.py saw it). The readers read the norms'
    new outputs, which are exactly 0, so their new columns are drawn at random (scaled like
    their old ones), exactly, and two SGD steps reach every new coordinate."""
    config_cls, model_cls, kwargs = LLAMA_FAMILY[case]
    rel, report, student = _llama_rel(case, 48, "zero")
    assert rel <= REL_TOL
    for r in READERS:
        w = student.tensors.get(f"model.layers.0.{r}.weight")
        assert float(w[:, 32:].std()) == pytest.approx(float(w.std()), rel=0.5), r
    emb = student.tensors.get("model.embed_tokens.weight")
    assert not emb[:, 32:].any()  # the embedding writes the stream: its new columns stay 0 (tied head too)
    big = _load_hf(config_cls, model_cls, _grown_config(kwargs, 48, 32 / 48), _student_tensors(student))
    grads = _new_coordinate_grads(big, _ids(kwargs["vocab_size"]), 32)
    assert all(g > 1e-6 for g in grads.values()), grads


def test_control_zero_readers_columns_give_the_new_coordinates_no_gradient():
    """The saddle itself: with the readers' new columns put back to 0, the same two SGD steps
    give every new coordinate exactly zero gradient (what the tool used to write)."""
    config_cls, model_cls, kwargs = LLAMA_FAMILY["llama-gqa-untied"]
    _, _, student = _llama_rel("llama-gqa-untied", 48, "zero")
    tensors = _student_tensors(student)
    for key, w in tensors.items():
        if any(f".{r}." in key for r in READERS) or key == "lm_head.weight":
            w[:, 32:] = 0
    big = _load_hf(config_cls, model_cls, _grown_config(kwargs, 48, 32 / 48), tensors)
    grads = _new_coordinate_grads(big, _ids(kwargs["vocab_size"]), 32)
    assert all(g == 0.0 for g in grads.values()), grads


# ------------------------------------------------------------------------------ d_model: GPT-2


@pytest.mark.parametrize("case", list(GPT2))
@pytest.mark.parametrize("width,split", [(40, "average"), (64, "average"), (64, "tile"), (45, None)])
def test_gpt2_stream_grows_exactly(case, width, split):
    rel, report, _ = _gpt2_rel(case, width, split)
    assert report.fill == (split or "average") and rel <= REL_TOL


def test_gpt2_average_expansion_gives_the_new_columns_the_row_means():
    _, _, student = _gpt2_rel("gpt2-tied", 40, "average")
    _, teacher = _teacher("GPT2Config", "GPT2LMHeadModel", GPT2["gpt2-tied"])
    for key in ("transformer.wte.weight", "transformer.wpe.weight"):
        old, new = teacher.tensors.get(key), student.tensors.get(key)
        assert torch.allclose(new[:, 32:], old.mean(1, keepdim=True).expand(-1, 8))
    c_proj = student.tensors.get("transformer.h.0.mlp.c_proj.weight")  # linear_t: [in, out]
    assert torch.allclose(c_proj[:, 32:], teacher.tensors.get("transformer.h.0.mlp.c_proj.weight").mean(1, keepdim=True).expand(-1, 8))
    assert torch.equal(student.tensors.get("transformer.ln_f.bias")[32:], torch.zeros(8))


def test_widening_a_writer_grows_the_same_stream():
    rel, report, _ = _gpt2_rel("gpt2-untied", 40, None, layer="transformer.h.1.attn.c_proj")
    assert report.fill == "average" and rel <= REL_TOL
    assert "transformer.wte" in report.group and "transformer.h.0.mlp.c_proj" in report.group


# ------------------------------------------------------------------------------ MLPs


@pytest.mark.parametrize("split,width,fill", [("equal", 70, "copy"), ("random", 70, "copy"), ("zero", 70, "zero"), ("tile", 96, "tile")])
def test_llama_swiglu_mlp_against_hf(split, width, fill):
    config_cls, model_cls, kwargs = LLAMA_FAMILY["llama-gqa-tied"]
    hf, teacher = _teacher(config_cls, model_cls, kwargs)
    student, report = widen(teacher, "model.layers.0.mlp.up_proj", width, split=split, seed=5)
    assert report.fill == fill and "model.layers.0.mlp.gate_proj" in report.group
    # The other layer keeps 48; HF has one intermediate_size, so give layer 1 the same growth.
    student, _ = widen(student, "model.layers.1.mlp.up_proj", width, split=split, seed=6)
    big = _load_hf(config_cls, model_cls, dict(kwargs, intermediate_size=width), _student_tensors(student))
    ids = _ids(kwargs["vocab_size"])
    assert _max_rel(_logits(big, ids), _logits(hf, ids)) <= REL_TOL


@pytest.mark.parametrize("split", ["equal", "random"])
def test_gpt2_gelu_mlp_against_hf(split):
    kwargs = GPT2["gpt2-tied"]
    hf, teacher = _teacher("GPT2Config", "GPT2LMHeadModel", kwargs)
    student = teacher
    for i in range(kwargs["n_layer"]):
        student, report = widen(student, f"transformer.h.{i}.mlp.c_fc", 150, split=split, seed=i)
        assert report.fill == "copy" and report.group == [f"transformer.h.{i}.mlp.c_fc"]
    cfg = transformers.GPT2Config(attn_implementation="eager", **dict(kwargs, n_inner=150))
    big = transformers.GPT2LMHeadModel(cfg).eval()
    sd = _student_tensors(student)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    big.load_state_dict(sd, strict=True)
    ids = _ids(kwargs["vocab_size"])
    assert _max_rel(_logits(big, ids), _logits(hf, ids)) <= REL_TOL


def test_mlp_widening_of_today_stays_copy_with_equal_shares():
    """A group without a norm keeps the paper's copy map: the default is the same as --split equal."""
    _, teacher = _teacher(*LLAMA_FAMILY["llama-gqa-untied"][:2], LLAMA_FAMILY["llama-gqa-untied"][2])
    a, ra = widen(teacher, "model.layers.0.mlp.up_proj", 60, seed=2)
    b, rb = widen(teacher, "model.layers.0.mlp.up_proj", 60, split="equal", seed=2)
    assert (ra.fill, ra.split) == ("copy", "equal") == (rb.fill, rb.split)
    for key in ra.changes:
        assert torch.equal(a.tensors.get(key["key"]), b.tensors.get(key["key"]))
    assert a.history == b.history


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "model,split,width,expect",
    [
        ("llama", "equal", 64, "use --split zero or --split tile"),
        ("llama", "random", 40, "use --split zero\n"),
        ("llama", "average", 40, "RMSNorm reads the mean square"),
        ("gpt2", "zero", 64, "use --split average or --split tile"),
        ("gpt2", "equal", 40, "LayerNorm reads the mean and variance"),
        ("llama", "tile", 40, "--split tile copies every unit k times, so the width must be a multiple of 32 (got 40); use --split zero\n"),
    ],
)
def test_modes_that_cannot_be_exact_are_refused_naming_those_that_would(model, split, width, expect):
    if model == "llama":
        _, teacher = _teacher(*LLAMA_FAMILY["llama-gqa-tied"])
        layer = "model.embed_tokens"
    else:
        _, teacher = _teacher("GPT2Config", "GPT2LMHeadModel", GPT2["gpt2-tied"])
        layer = "transformer.wte"
    with pytest.raises(N2NError) as e:
        widen(teacher, layer, width, split=split)
    message = str(e.value) + "\n"
    assert message.startswith(f"cannot widen {layer!r} exactly: at node ")
    assert expect in message


def test_inspect_names_the_stream_group():
    _, teacher = _teacher(*LLAMA_FAMILY["llama-gqa-tied"])
    group, refused = widen_group(teacher, "model.embed_tokens")
    assert refused is None
    assert {"model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"} <= set(group)


# ------------------------------------------------------------------------------ negative controls


def _unscale_gamma(tensors, report):
    n, q = report.old_width, report.new_width
    for key in tensors:
        if key.endswith("norm.weight") or key.endswith("layernorm.weight"):
            tensors[key][:n] /= math.sqrt(n / q)


def test_control_gamma_not_rescaled_is_caught():
    rel, _, _ = _llama_rel("llama-gqa-untied", 48, "zero", tamper=_unscale_gamma)
    assert rel > 100 * REL_TOL


def test_control_eps_not_changed_is_caught():
    rel, _, _ = _llama_rel("llama-gqa-untied", 48, "zero", eps_factor=1.0)
    assert rel > 10 * REL_TOL


def test_control_tile_dividing_the_tied_heads_columns_is_caught():
    def divide_head(tensors, report):
        k = report.new_width // report.old_width
        tensors["model.norm.weight"] *= k  # undo the final norm's 1/k ...
        tensors["model.embed_tokens.weight"] /= k  # ... and divide the head's columns: the head IS the embedding

    rel, _, _ = _llama_rel("llama-gqa-tied", 64, "tile", tamper=divide_head)
    assert rel > 100 * REL_TOL


@pytest.fixture
def loosened(monkeypatch):
    """Let a norm allow a mode it refuses, to show the refusal is what keeps the result exact."""

    def loosen(op_name: str, modes: set):
        op, modes = ops_base.REGISTRY[op_name], frozenset(modes)
        monkeypatch.setitem(ops_base.REGISTRY, op_name, replace(op, fill_modes=modes, widen=norms._widen_rule(modes)))

    return loosen


def test_control_zero_padding_under_layernorm_is_not_exact(loosened):
    loosened("layernorm", {"tile", "average", "zero"})
    rel, report, _ = _gpt2_rel("gpt2-untied", 40, "zero")
    assert report.fill == "zero" and rel > 100 * REL_TOL


def test_control_average_under_rmsnorm_is_not_exact(loosened):
    loosened("rmsnorm", {"tile", "zero", "average"})
    hf, teacher = _teacher(*LLAMA_FAMILY["llama-gqa-untied"])
    student, report = widen(teacher, "model.embed_tokens", 40, split="average")
    ids = _ids(97)
    (ours,) = run(student, {"input_ids": ids})
    assert report.fill == "average" and _max_rel(ours, _logits(hf, ids)) > 10 * REL_TOL  # small row means: a small error, still caught


def test_control_a_random_copy_map_through_a_norm_is_not_exact(loosened):
    loosened("rmsnorm", {"copy", "tile", "zero"})
    hf, teacher = _teacher(*LLAMA_FAMILY["llama-gqa-untied"])
    student, report = widen(teacher, "model.embed_tokens", 40, split="equal")
    ids = _ids(97)
    (ours,) = run(student, {"input_ids": ids})
    assert report.fill == "copy" and _max_rel(ours, _logits(hf, ids)) > 100 * REL_TOL


# ------------------------------------------------------------------------------ the CLI and recipes


def test_cli_grows_the_shipped_llama_and_names_the_fill(runner, tmp_path):
    out = tmp_path / "wide.safetensors"
    r = runner.invoke(app, ["widen", str(RECIPES / "llama-tiny.safetensors"), "--layer", "model.embed_tokens", "--width", "48", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["fill"] == "zero" and report["split"] == "zero" and report["verification"]["passed"] is True
    human = runner.invoke(app, ["widen", str(RECIPES / "gpt2-tiny.safetensors"), "--layer", "transformer.wte", "--width", "64", "--split", "tile", "-o", str(tmp_path / "g.safetensors")])
    assert human.exit_code == 0, human.output
    assert "fill tile" in human.output


def test_cli_student_of_the_shipped_llama_loads_into_hf_and_agrees(runner, tmp_path):
    from safetensors.torch import load_file

    from n2nsurgery.examples_transformers import LLAMA_TINY_CONFIG

    out = tmp_path / "wide.safetensors"
    r = runner.invoke(app, ["widen", str(RECIPES / "llama-tiny.safetensors"), "--layer", "model.embed_tokens", "--width", "40", "-o", str(out)])
    assert r.exit_code == 0, r.output
    fields = {k: v for k, v in LLAMA_TINY_CONFIG.items() if k not in ("model_type", "architectures")}
    teacher = _load_hf("LlamaConfig", "LlamaForCausalLM", fields, load_file(str(RECIPES / "llama-tiny.safetensors")))
    grown = dict(fields, hidden_size=40, head_dim=fields.get("head_dim", 8), rms_norm_eps=fields["rms_norm_eps"] * 32 / 40)
    student = _load_hf("LlamaConfig", "LlamaForCausalLM", grown, load_file(str(out)))
    ids = _ids(fields["vocab_size"])
    assert _max_rel(_logits(student, ids), _logits(teacher, ids)) <= REL_TOL


def test_cli_refuses_a_random_map_through_a_norm_with_one_line(runner, tmp_path):
    out = tmp_path / "wide.safetensors"
    r = runner.invoke(app, ["widen", str(RECIPES / "gpt2-tiny.safetensors"), "--layer", "transformer.wte", "--width", "48", "--split", "random", "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "use --split average" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_recipe_accepts_the_fill_modes(runner, tmp_path):
    recipe = tmp_path / "grow.yaml"
    recipe.write_text("steps:\n  - widen: {layer: model.embed_tokens, width: 64, split: tile}\n  - widen: {layer: model.layers.0.mlp.up_proj, width: 80}\n")
    out = tmp_path / "grown.safetensors"
    r = runner.invoke(app, ["apply", str(RECIPES / "llama-tiny.safetensors"), str(recipe), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("layer", ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj"])
def test_widening_a_writer_of_the_shipped_llama_grows_its_stream(layer):
    """Before d_model growth these were refused at the first rmsnorm; now they are the stream."""
    from n2nsurgery import load_model

    model = load_model(str(RECIPES / "llama-tiny.safetensors"))
    group, refused = widen_group(model, layer)
    assert refused is None and "model.embed_tokens" in group


# ------------------------------------------------------------------------------ other stream shapes

POST_NORM = """format: n2n-arch/1
inputs:
  ids: {shape: [5], dtype: int64, high: 11}
nodes:
  - {name: emb, op: embedding, in: ids}
  - {name: f1, op: linear, in: emb}
  - {name: r1, op: add, in: [emb, f1]}
  - {name: ln1, op: %(norm)s, in: r1, eps: 0.01}
  - {name: f2, op: linear, in: ln1}
  - {name: r2, op: add, in: [ln1, f2]}
  - {name: ln2, op: %(norm)s, in: r2, eps: 0.01}
  - {name: head, op: linear, in: ln2}
outputs: [head]
"""


def _post_norm(norm: str):
    g = torch.Generator().manual_seed(0)
    t = {"emb.weight": torch.randn(11, 6, generator=g), "head.weight": torch.randn(7, 6, generator=g)}
    for name in ("f1", "f2"):
        t[f"{name}.weight"], t[f"{name}.bias"] = torch.randn(6, 6, generator=g), torch.randn(6, generator=g)
    for name in ("ln1", "ln2"):
        t[f"{name}.weight"] = 1 + 0.3 * torch.randn(6, generator=g)
        if norm == "layernorm":
            t[f"{name}.bias"] = 0.3 * torch.randn(6, generator=g)
    return model_from_state_dict(POST_NORM % {"norm": norm}, t)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_a_post_norm_stream_is_exact_only_tiled(norm):
    """Where the norm's output IS the stream, its new outputs (0) are not what the next norm
    needs (the mean, under LayerNorm), so only a tile is exact: the others are refused."""
    teacher = _post_norm(norm)
    ids = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(2))
    student, report = widen(teacher, "emb", 12, split="tile")
    (a,), (b,) = run(teacher, {"ids": ids}), run(student, {"ids": ids})
    assert report.fill == "tile" and _max_rel(b, a) <= REL_TOL
    if norm == "layernorm":
        with pytest.raises(N2NError, match="use --split tile"):
            widen(teacher, "emb", 9)
    else:  # zero-padding: the norm's new outputs are 0, which is what the next RMSNorm keeps
        student, report = widen(teacher, "emb", 9)
        (b,) = run(student, {"ids": ids})
        assert report.fill == "zero" and _max_rel(b, a) <= REL_TOL
    # Reached from a writer, a norm's output is met from its consumer side first: the same modes
    student, report = widen(teacher, "f2", 12 if norm == "layernorm" else 9)
    (b,) = run(student, {"ids": ids})
    assert report.fill == ("tile" if norm == "layernorm" else "zero") and _max_rel(b, a) <= REL_TOL


TIED_TWO_READERS = """format: n2n-arch/1
inputs:
  ids: {shape: [5], dtype: int64, high: 11}
nodes:
  - {name: emb, op: embedding, in: ids}
  - {name: norm, op: rmsnorm, in: emb, eps: 0.01}
  - {name: head, op: linear, in: norm, params: {weight: emb.weight}}
  - {name: aux, op: linear, in: norm}
outputs: [head, aux]
"""


def test_a_tile_is_refused_when_the_norm_before_a_tied_head_has_other_readers():
    g = torch.Generator().manual_seed(0)
    t = {"emb.weight": torch.randn(11, 6, generator=g), "norm.weight": torch.rand(6, generator=g) + 0.5, "aux.weight": torch.randn(3, 6, generator=g)}
    teacher = model_from_state_dict(TIED_TWO_READERS, t)
    with pytest.raises(N2NError, match=r"at node 'norm', a tied head needs this norm's output divided by k, but 'head', 'aux' read it; use --split zero"):
        widen(teacher, "emb", 12, split="tile")
    student, report = widen(teacher, "emb", 12)  # zero-padding serves the tied head as it is
    ids = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    for a, b in zip(run(teacher, {"ids": ids}), run(student, {"ids": ids})):
        assert _max_rel(b, a) <= REL_TOL
    assert report.fill == "zero" and "head.weight" not in student.tensors
