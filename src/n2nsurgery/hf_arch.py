"""Architectures for Hugging Face causal LMs, built from their ``config.json`` (docs/format.md#architectures-from-hugging-face-configs).

:func:`arch_from_config` turns the config of a GPT-2, Llama, Mistral or Qwen2 model into the n2n
architecture that computes what ``AutoModelForCausalLM`` computes (logits of one sequence of
token ids), with node names that follow the Hugging Face module paths, so the parameter keys are
exactly the model's own ``state_dict`` keys::

    model.embed_tokens                       embedding      (model.embed_tokens.weight)
    model.layers.0.input_layernorm           rmsnorm
    model.layers.0.self_attn.q_proj          linear         (model.layers.0.self_attn.q_proj.weight)
    model.layers.0.self_attn                 attention      (q, k, v; GQA; rotary)
    model.layers.0                           add            (the block's output)
    lm_head                                  linear         (tied: params {weight: model.embed_tokens.weight})

Nodes that are not modules in Hugging Face (the residual adds, the SwiGLU product, the q/k/v
parts of GPT-2's fused ``c_attn``) get names under their block that no tensor key uses.

A config field that would change the function in a way the op set cannot express (rope scaling,
a sliding window shorter than the sequence, q/k norms, GPT-2's per-layer attention scaling) is
refused with an :class:`~n2nsurgery.errors.N2NError` naming the field, never ignored.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from .arch import Architecture, InputSpec, Node, parse_architecture
from .errors import N2NError

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")
DEFAULT_SEQ_LEN = 8  # token positions of the architecture's input (what verify probes)

# Hugging Face activation names (ACT2FN) -> (op, attributes). gelu_new is the tanh approximation
# written out (NewGELUActivation); it agrees with torch's tanh GELU to float32 rounding.
_ACTIVATIONS = {
    "gelu_new": ("gelu", {"approximate": "tanh"}),
    "gelu_pytorch_tanh": ("gelu", {"approximate": "tanh"}),
    "gelu": ("gelu", {}),
    "relu": ("relu", {}),
    "silu": ("silu", {}),
    "swish": ("silu", {}),
}

_REQUIRED = object()


class _Config:
    """Typed reads of config fields; every failure names the file and the field."""

    def __init__(self, cfg: Mapping, source: str):
        self.cfg = cfg
        self.source = source

    def fail(self, message: str):
        raise N2NError(f"{self.source}: {message}")

    def raw(self, field: str, default: Any = None) -> Any:
        return self.cfg.get(field, default)

    def integer(self, field: str, default: Any = _REQUIRED, minimum: int = 1):
        """A positive integer; a field that is absent or null takes `default`."""
        v = self.cfg.get(field)
        if v is None:
            if default is _REQUIRED:
                self.fail(f"needs {field} (a positive integer)")
            return default
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            self.fail(f"{field} must be an integer of at least {minimum}, got {v!r}")
        return v

    def number(self, field: str, default: float) -> float:
        v = self.cfg.get(field)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            self.fail(f"{field} must be a non-negative number, got {v!r}")
        return float(v)

    def flag(self, field: str, default: bool) -> bool:
        v = self.cfg.get(field)
        if v is None:
            return default
        if not isinstance(v, bool):
            self.fail(f"{field} must be true or false, got {v!r}")
        return v

    def refuse_if(self, field: str, why: str) -> None:
        """Refuse a config whose `field` is set (truthy): the op set cannot compute it yet."""
        v = self.cfg.get(field)
        if v:
            self.fail(f"{field} = {v!r} is not supported yet ({why}); n2n can build an architecture only for {field} false/absent")

    def activation(self, field: str, default: str) -> tuple:
        name = self.cfg.get(field, default)
        if name not in _ACTIVATIONS:
            self.fail(f"{field} {name!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
        op, attrs = _ACTIVATIONS[name]
        return op, dict(attrs)


# ---------------------------------------------------------------------------------- public


def arch_from_config(cfg: Mapping, seq_len: Optional[int] = None, source: str = "config.json") -> Architecture:
    """The n2n architecture of the causal LM that a Hugging Face config describes.

    Args:
        cfg: the parsed ``config.json`` (or ``PretrainedConfig.to_dict()``).
        seq_len: token positions of the input ``input_ids`` (default :data:`DEFAULT_SEQ_LEN`,
            or the GPT-2 position table's size when that is smaller).
        source: the config's file name, for messages.

    Returns:
        A validated :class:`~n2nsurgery.arch.Architecture` with one input
        ``input_ids: {shape: [seq_len], dtype: int64, high: vocab_size}`` and one output, the
        logits (node ``lm_head``, ``[seq_len, vocab_size]``).

    Raises:
        N2NError: an unsupported ``model_type`` or config field, or an inconsistent config.

    Example:
        >>> arch = arch_from_config({"model_type": "llama", "vocab_size": 64, "hidden_size": 16,
        ...     "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        ...     "num_key_value_heads": 1, "tie_word_embeddings": True})
        >>> arch.inputs["input_ids"].shape, arch.outputs
        ((8,), ['lm_head'])
    """
    if not isinstance(cfg, Mapping):
        raise N2NError(f"{source}: a config must be a JSON object, got {type(cfg).__name__}")
    c = _Config(cfg, source)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        c.fail(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise N2NError(f"the sequence length must be a positive integer, got {seq_len!r}")
    build = _gpt2 if model_type == "gpt2" else _llama_family
    inputs, nodes, outputs = build(c, model_type, seq_len)
    arch = Architecture(inputs={s.name: s for s in inputs}, nodes=nodes, outputs=outputs, name=model_type)
    return parse_architecture(arch.to_yaml(), source=f"{source} (the architecture built from it)")


def arch_yaml_from_config(cfg: Mapping, seq_len: Optional[int] = None, source: str = "config.json") -> str:
    """:func:`arch_from_config` as architecture YAML text."""
    return arch_from_config(cfg, seq_len, source).to_yaml()


# ---------------------------------------------------------------------------------- helpers


def _node(name: str, op: str, inputs, params: Optional[dict] = None, **attrs) -> Node:
    return Node(name=name, op=op, inputs=[inputs] if isinstance(inputs, str) else list(inputs), attrs=attrs, params=params or {})


def _ids(c: _Config, seq_len: int) -> InputSpec:
    return InputSpec(name="input_ids", shape=(seq_len,), dtype="int64", high=c.integer("vocab_size"))


def _heads(c: _Config, hidden: int, heads: int, head_dim_field: Optional[str]) -> int:
    """head_dim: the explicit field when present, else hidden / heads (which must divide)."""
    explicit = c.integer(head_dim_field, default=None) if head_dim_field else None
    if explicit is not None:
        return explicit
    if hidden % heads:
        c.fail(f"hidden size {hidden} does not split into {heads} attention heads; give head_dim")
    return hidden // heads


def _lm_head(prev: str, tied: bool, embedding_key: str) -> Node:
    return _node("lm_head", "linear", prev, params={"weight": embedding_key} if tied else None)


# ---------------------------------------------------------------------------------- GPT-2


def _gpt2(c: _Config, model_type: str, seq_len: Optional[int]):
    positions = c.integer("n_positions")
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, positions)
    if seq_len > positions:
        raise N2NError(f"{c.source}: sequence length {seq_len} exceeds n_positions {positions} (the position table); use at most {positions}")
    hidden, layers, heads = c.integer("n_embd"), c.integer("n_layer"), c.integer("n_head")
    head_dim = _heads(c, hidden, heads, None)
    c.integer("n_inner", default=4 * hidden)  # null means 4·n_embd; the width itself comes from the tensors
    eps = c.number("layer_norm_epsilon", 1e-5)
    act_op, act_attrs = c.activation("activation_function", "gelu_new")
    c.refuse_if("scale_attn_by_inverse_layer_idx", "it scales layer i's attention by 1/(i+1), which deepening would have to renumber")
    c.refuse_if("reorder_and_upcast_attn", "a different float32 upcasting of the attention scores")
    c.refuse_if("add_cross_attention", "cross-attention reads an encoder's states, which a causal LM architecture has no input for")
    # scale_attn_weights false: raw q·k scores (scale 1); true: the usual 1/sqrt(head_dim).
    scale = {} if c.flag("scale_attn_weights", True) else {"scale": 1.0}

    nodes = [
        _node("transformer.wte", "embedding", "input_ids"),
        _node("transformer.wpe", "position_embedding", "input_ids"),
        _node("transformer.embeddings", "add", ["transformer.wte", "transformer.wpe"]),
    ]
    prev = "transformer.embeddings"
    for i in range(layers):
        b = f"transformer.h.{i}"
        nodes += [
            _node(f"{b}.ln_1", "layernorm", prev, eps=eps),
            _node(f"{b}.attn.c_attn", "linear_t", f"{b}.ln_1"),
            # c_attn lays its output out as [q | k | v]
            _node(f"{b}.attn.q", "chunk", f"{b}.attn.c_attn", chunks=3, index=0),
            _node(f"{b}.attn.k", "chunk", f"{b}.attn.c_attn", chunks=3, index=1),
            _node(f"{b}.attn.v", "chunk", f"{b}.attn.c_attn", chunks=3, index=2),
            _node(f"{b}.attn", "attention", [f"{b}.attn.q", f"{b}.attn.k", f"{b}.attn.v"],
                  num_heads=heads, num_kv_heads=heads, head_dim=head_dim, causal=True, **scale),
            _node(f"{b}.attn.c_proj", "linear_t", f"{b}.attn"),
            _node(f"{b}.attn_residual", "add", [prev, f"{b}.attn.c_proj"]),
            _node(f"{b}.ln_2", "layernorm", f"{b}.attn_residual", eps=eps),
            _node(f"{b}.mlp.c_fc", "linear_t", f"{b}.ln_2"),
            _node(f"{b}.mlp.act", act_op, f"{b}.mlp.c_fc", **act_attrs),
            _node(f"{b}.mlp.c_proj", "linear_t", f"{b}.mlp.act"),
            _node(b, "add", [f"{b}.attn_residual", f"{b}.mlp.c_proj"]),
        ]
        prev = b
    nodes += [
        _node("transformer.ln_f", "layernorm", prev, eps=eps),
        _lm_head("transformer.ln_f", c.flag("tie_word_embeddings", True), "transformer.wte.weight"),
    ]
    return [_ids(c, seq_len)], nodes, ["lm_head"]


# ---------------------------------------------------------------------------------- Llama family


def _rope_theta(c: _Config) -> float:
    """The rotary base, from transformers 5's ``rope_parameters`` or the older ``rope_theta``;
    any rope scaling is refused (it changes the tables)."""
    scaling = c.raw("rope_scaling")
    if scaling is not None and not (isinstance(scaling, Mapping) and _rope_type(scaling) == "default" and set(scaling) <= {"rope_type", "type"}):
        c.fail(f"rope_scaling {scaling!r} is not supported yet (it changes the rotary tables); n2n supports the default rotary only (rope_scaling null)")
    params = c.raw("rope_parameters")
    if params is None:
        return c.number("rope_theta", 10000.0)
    if not isinstance(params, Mapping):
        c.fail(f"rope_parameters must be an object such as {{rope_type: default, rope_theta: 10000.0}}, got {params!r}")
    if _rope_type(params) != "default":
        c.fail(f"rope_parameters.rope_type {_rope_type(params)!r} is not supported yet (it changes the rotary tables); n2n supports rope_type 'default' only")
    extra = sorted(set(params) - {"rope_type", "type", "rope_theta"})
    if extra:
        c.fail(f"rope_parameters.{extra[0]} is not supported yet (n2n supports rope_type 'default' with rope_theta only)")
    theta = params.get("rope_theta", c.raw("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
        c.fail(f"rope_parameters.rope_theta must be a positive number, got {theta!r}")
    return float(theta)


def _rope_type(params: Mapping):
    return params.get("rope_type", params.get("type", "default"))


def _sliding_window(c: _Config, model_type: str) -> Optional[int]:
    """The attention window the config asks for, or None for full causal attention."""
    if model_type == "mistral":
        return c.integer("sliding_window", default=None)
    if model_type == "qwen2":
        types = c.raw("layer_types") or []
        if c.flag("use_sliding_window", False) or "sliding_attention" in types:
            return c.integer("sliding_window", default=None)
    return None


def _llama_family(c: _Config, model_type: str, seq_len: Optional[int]):
    seq_len = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    hidden, layers = c.integer("hidden_size"), c.integer("num_hidden_layers")
    heads = c.integer("num_attention_heads")
    kv_heads = c.integer("num_key_value_heads", default=heads)
    if heads % kv_heads:
        c.fail(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = _heads(c, hidden, heads, "head_dim")
    c.integer("intermediate_size")  # the width itself comes from the tensors
    eps = c.number("rms_norm_eps", 1e-6)
    act_op, act_attrs = c.activation("hidden_act", "silu")
    theta = _rope_theta(c)
    partial = c.raw("partial_rotary_factor")
    if partial is not None and partial != 1:
        c.fail(f"partial_rotary_factor {partial!r} is not supported yet (rotary over part of each head); n2n supports 1.0 only")
    for field in ("qk_norm", "use_qk_norm"):
        c.refuse_if(field, "a norm on q and k inside the attention, which the attention op does not have")
    window = _sliding_window(c, model_type)
    if window is not None and window < seq_len:
        c.fail(
            f"sliding_window {window} is shorter than the sequence length {seq_len}, and n2n's attention "
            f"is full causal attention; use a sequence length of at most {window}"
        )

    nodes = [_node("model.embed_tokens", "embedding", "input_ids")]
    prev = "model.embed_tokens"
    for i in range(layers):
        b = f"model.layers.{i}"
        a = f"{b}.self_attn"
        nodes += [
            _node(f"{b}.input_layernorm", "rmsnorm", prev, eps=eps),
            _node(f"{a}.q_proj", "linear", f"{b}.input_layernorm"),
            _node(f"{a}.k_proj", "linear", f"{b}.input_layernorm"),
            _node(f"{a}.v_proj", "linear", f"{b}.input_layernorm"),
            _node(a, "attention", [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"],
                  num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, causal=True,
                  rope={"theta": theta, "style": "rotate_half"}),
            _node(f"{a}.o_proj", "linear", a),
            _node(f"{b}.attn_residual", "add", [prev, f"{a}.o_proj"]),
            _node(f"{b}.post_attention_layernorm", "rmsnorm", f"{b}.attn_residual", eps=eps),
            _node(f"{b}.mlp.gate_proj", "linear", f"{b}.post_attention_layernorm"),
            _node(f"{b}.mlp.act_fn", act_op, f"{b}.mlp.gate_proj", **act_attrs),
            _node(f"{b}.mlp.up_proj", "linear", f"{b}.post_attention_layernorm"),
            _node(f"{b}.mlp.mul", "mul", [f"{b}.mlp.act_fn", f"{b}.mlp.up_proj"]),
            _node(f"{b}.mlp.down_proj", "linear", f"{b}.mlp.mul"),
            _node(b, "add", [f"{b}.attn_residual", f"{b}.mlp.down_proj"]),
        ]
        prev = b
    nodes += [
        _node("model.norm", "rmsnorm", prev, eps=eps),
        _lm_head("model.norm", c.flag("tie_word_embeddings", False), "model.embed_tokens.weight"),
    ]
    return [_ids(c, seq_len)], nodes, ["lm_head"]
