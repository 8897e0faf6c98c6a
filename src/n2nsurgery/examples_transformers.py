"""The shipped transformer examples: a 2-layer GPT-2 and a 2-layer Llama (GQA, tied head).

``recipes/gpt2-tiny.*`` and ``recipes/llama-tiny.*`` were made by ``python -m
n2nsurgery.examples_transformers recipes``. Each is a Hugging Face config (the dicts below, as a
``config.json`` would hold them), the n2n architecture built from it by
:func:`n2nsurgery.hf_arch.arch_from_config`, and seeded random tensors under the model's own
``state_dict`` keys. The checkpoint carries its architecture in its metadata, like every
checkpoint the tool writes; the YAML beside it is the same text.

The tensors are drawn here, not by ``transformers`` (which is only a test dependency and whose
initialisers may change between releases), so the files are the same bytes on every machine.
Norm weights and biases are drawn away from 1 and 0, as after training, because default values
hide remapping bugs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

GPT2_TINY_CONFIG = {
    "model_type": "gpt2",
    "architectures": ["GPT2LMHeadModel"],
    "vocab_size": 96,
    "n_positions": 16,
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_inner": None,  # 4 · n_embd
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": 0,
}

LLAMA_TINY_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA: two query heads per key/value head
    "head_dim": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": 0,
}

# name -> config
EXAMPLES = {"gpt2-tiny": GPT2_TINY_CONFIG, "llama-tiny": LLAMA_TINY_CONFIG}


def gpt2_shapes(cfg: dict) -> dict:
    """state_dict key -> shape of a GPT2LMHeadModel (Conv1D weights are [in, out])."""
    d, inner = cfg["n_embd"], cfg["n_inner"] or 4 * cfg["n_embd"]
    shapes = {"transformer.wte.weight": (cfg["vocab_size"], d), "transformer.wpe.weight": (cfg["n_positions"], d)}
    for i in range(cfg["n_layer"]):
        b = f"transformer.h.{i}"
        shapes.update({
            f"{b}.ln_1.weight": (d,), f"{b}.ln_1.bias": (d,),
            f"{b}.attn.c_attn.weight": (d, 3 * d), f"{b}.attn.c_attn.bias": (3 * d,),
            f"{b}.attn.c_proj.weight": (d, d), f"{b}.attn.c_proj.bias": (d,),
            f"{b}.ln_2.weight": (d,), f"{b}.ln_2.bias": (d,),
            f"{b}.mlp.c_fc.weight": (d, inner), f"{b}.mlp.c_fc.bias": (inner,),
            f"{b}.mlp.c_proj.weight": (inner, d), f"{b}.mlp.c_proj.bias": (d,),
        })
    shapes.update({"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)})
    if not cfg.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = (cfg["vocab_size"], d)
    return shapes


def llama_shapes(cfg: dict) -> dict:
    """state_dict key -> shape of a LlamaForCausalLM without biases."""
    d, inter = cfg["hidden_size"], cfg["intermediate_size"]
    h, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], d)}
    for i in range(cfg["num_hidden_layers"]):
        b = f"model.layers.{i}"
        shapes.update({
            f"{b}.input_layernorm.weight": (d,),
            f"{b}.self_attn.q_proj.weight": (h * hd, d),
            f"{b}.self_attn.k_proj.weight": (kv * hd, d),
            f"{b}.self_attn.v_proj.weight": (kv * hd, d),
            f"{b}.self_attn.o_proj.weight": (d, h * hd),
            f"{b}.post_attention_layernorm.weight": (d,),
            f"{b}.mlp.gate_proj.weight": (inter, d),
            f"{b}.mlp.up_proj.weight": (inter, d),
            f"{b}.mlp.down_proj.weight": (d, inter),
        })
    shapes["model.norm.weight"] = (d,)
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (cfg["vocab_size"], d)
    return shapes


def _is_norm(key: str) -> bool:
    return any(part in key for part in ("norm", ".ln_"))


def _draw(key: str, shape: tuple, gen: torch.Generator, transposed: bool) -> torch.Tensor:
    noise = torch.randn(shape, generator=gen)
    if _is_norm(key) and key.endswith(".weight"):
        return 1 + 0.2 * noise  # a trained-looking gain, not all ones
    if key.endswith(".bias"):
        return 0.1 * noise
    if len(shape) == 2 and ("wte" in key or "wpe" in key or "embed_tokens" in key):
        return 0.5 * noise
    fan_in = shape[0] if transposed else shape[1]
    return noise / fan_in**0.5


def state_dict(name: str, seed: int = 0) -> dict:
    """Seeded tensors for example `name`, under its Hugging Face state_dict keys, in float32."""
    cfg = EXAMPLES[name]
    gpt2 = cfg["model_type"] == "gpt2"
    shapes = gpt2_shapes(cfg) if gpt2 else llama_shapes(cfg)
    gen = torch.Generator().manual_seed(seed)
    return {k: _draw(k, s, gen, transposed=gpt2) for k, s in shapes.items()}


def build_model(name: str, seed: int = 0):
    """Example `name` as an n2n :class:`~n2nsurgery.model.Model`."""
    from .hf_arch import arch_from_config
    from .model import model_from_state_dict

    return model_from_state_dict(arch_from_config(EXAMPLES[name], source=f"{name} config"), state_dict(name, seed))


def write_examples(folder: str) -> None:
    """Write ``<name>.safetensors`` (carrying its architecture) and ``<name>.yaml`` per example."""
    from .model import save_model

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name in EXAMPLES:
        model = build_model(name)
        save_model(model, str(out / f"{name}.safetensors"))
        (out / f"{name}.yaml").write_text(model.arch.to_yaml())


if __name__ == "__main__":
    write_examples(sys.argv[1] if len(sys.argv) > 1 else "recipes")
