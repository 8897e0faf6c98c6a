"""n2n's executor against Hugging Face itself: the architecture hf_arch builds from a config,
bound to the real model's state_dict, must give the real model's logits (max relative |Δ| ≤ 1e-5,
float32), for GPT-2, Llama (GQA, tied and untied, biases, explicit head_dim), Mistral and Qwen2,
with both the eager and the sdpa attention of transformers.

The teachers are random-init models from tiny configs (nothing is downloaded), with norm gains
and biases moved away from their init values of 1 and 0, and a large norm eps (1e-2) in most
cases: defaults hide mistakes (a forgotten bias, a misplaced eps).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import RECIPES  # noqa: E402
from n2nsurgery import load_model, model_from_state_dict  # noqa: E402
from n2nsurgery.examples_transformers import GPT2_TINY_CONFIG, LLAMA_TINY_CONFIG  # noqa: E402
from n2nsurgery.executor import run  # noqa: E402
from n2nsurgery.hf_arch import arch_from_config  # noqa: E402

transformers.logging.set_verbosity_error()

REL_TOL = 1e-5
IMPLS = ("eager", "sdpa")

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)

CASES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=97, n_positions=12, n_embd=32, n_layer=2, n_head=4, layer_norm_epsilon=1e-2)),
    "gpt2-untied-unscaled-relu": (
        "GPT2Config", "GPT2LMHeadModel",
        dict(vocab_size=97, n_positions=12, n_embd=32, n_layer=2, n_head=2, n_inner=40, tie_word_embeddings=False,
             scale_attn_weights=False, activation_function="relu"),
    ),
    "llama-gqa-untied": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, num_key_value_heads=2, rms_norm_eps=1e-2)),
    "llama-gqa-tied": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, num_key_value_heads=1, rms_norm_eps=1e-2, tie_word_embeddings=True)),
    "llama-head-dim-biases-theta": (
        "LlamaConfig", "LlamaForCausalLM",
        dict(SMALL, num_key_value_heads=2, head_dim=12, attention_bias=True, mlp_bias=True, rope_theta=500.0, rms_norm_eps=1e-5),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(SMALL, num_key_value_heads=2, rms_norm_eps=1e-2, sliding_window=None)),
    "mistral-window-longer-than-sequence": ("MistralConfig", "MistralForCausalLM", dict(SMALL, num_key_value_heads=2, sliding_window=4096)),
    "qwen2-qkv-biases": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, num_key_value_heads=2, rms_norm_eps=1e-2, tie_word_embeddings=True)),
}


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Norm gains off 1 and biases off 0, as after training (init values would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def _hf_model(config_cls: str, model_cls: str, kwargs: dict, impl: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(attn_implementation=impl, **kwargs)
    model = getattr(transformers, model_cls)(cfg).eval()
    _perturb(model, seed)
    return cfg, model


def _max_rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def _logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(ids).logits


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_n2n_computes_what_transformers_computes(case, impl):
    config_cls, model_cls, kwargs = CASES[case]
    cfg, hf = _hf_model(config_cls, model_cls, kwargs, impl)
    seq_len = 10
    model = model_from_state_dict(arch_from_config(cfg.to_dict(), seq_len=seq_len), hf.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (6, seq_len), generator=torch.Generator().manual_seed(1))
    (ours,) = run(model, {"input_ids": ids})
    assert _max_rel(ours, _logits(hf, ids)) <= REL_TOL


def test_tied_head_reads_the_embedding():
    """With tie_word_embeddings the head is the embedding: a state_dict without lm_head.weight (as
    save_pretrained writes it) is complete, and changing the embedding changes the logits."""
    config_cls, model_cls, kwargs = CASES["llama-gqa-tied"]
    cfg, hf = _hf_model(config_cls, model_cls, kwargs, "sdpa")
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    model = model_from_state_dict(arch_from_config(cfg.to_dict()), sd)
    ids = torch.randint(0, cfg.vocab_size, (4, 8), generator=torch.Generator().manual_seed(2))
    (ours,) = run(model, {"input_ids": ids})
    assert _max_rel(ours, _logits(hf, ids)) <= REL_TOL


def test_gpt2_at_the_full_position_table():
    config_cls, model_cls, kwargs = CASES["gpt2"]
    cfg, hf = _hf_model(config_cls, model_cls, kwargs, "eager")
    model = model_from_state_dict(arch_from_config(cfg.to_dict(), seq_len=cfg.n_positions), hf.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (3, cfg.n_positions), generator=torch.Generator().manual_seed(3))
    (ours,) = run(model, {"input_ids": ids})
    assert _max_rel(ours, _logits(hf, ids)) <= REL_TOL


@pytest.mark.parametrize(
    "name,config_cls,model_cls,config",
    [
        ("gpt2-tiny", "GPT2Config", "GPT2LMHeadModel", GPT2_TINY_CONFIG),
        ("llama-tiny", "LlamaConfig", "LlamaForCausalLM", LLAMA_TINY_CONFIG),
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_shipped_examples_load_into_transformers_and_agree(name, config_cls, model_cls, config, impl):
    """The shipped checkpoints are real Hugging Face weights: the HF class of their config loads
    them with nothing unexpected (only the tied head is absent) and gives n2n's logits."""
    ours_model = load_model(str(RECIPES / f"{name}.safetensors"))
    sd = ours_model.tensors.to_dict()
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(attn_implementation=impl, **fields)).eval()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    assert torch.equal(hf.get_output_embeddings().weight, hf.get_input_embeddings().weight)  # still tied
    ids = torch.randint(0, config["vocab_size"], (5, 8), generator=torch.Generator().manual_seed(4))
    (ours,) = run(ours_model, {"input_ids": ids})
    assert _max_rel(ours, _logits(hf, ids)) <= REL_TOL
