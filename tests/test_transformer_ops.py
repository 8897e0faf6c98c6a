"""The transformer op set (docs/ops.md#transformer-ops): embedding, position_embedding, layernorm, rmsnorm,
attention, chunk, linear_t -- forward against hand-written references, shape and attribute
errors that name the node, value ranges, widening refused -- and hf_arch's config checks.

Tests that compare against transformers' own functions skip when it is not installed; the
whole-model comparisons live in test_hf_equivalence.py.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import RECIPES, assert_close
from n2nsurgery import N2NError, load_model, model_from_state_dict, parse_architecture
from n2nsurgery.cli import app
from n2nsurgery.deepen import value_ranges
from n2nsurgery.executor import run
from n2nsurgery.hf_arch import arch_from_config
from n2nsurgery.ops.attention import apply_rope, rope_tables
from n2nsurgery.ops.base import Interval
from n2nsurgery.widen import widen_group

G = torch.Generator().manual_seed(0)


def _randn(*shape, dtype=torch.float64):
    return torch.randn(shape, generator=G, dtype=dtype)


def _arch(inputs: str, nodes: str, outputs: str) -> str:
    return f"format: n2n-arch/1\ninputs:\n{inputs}\nnodes:\n{nodes}\noutputs: [{outputs}]\n"


def _run1(arch_text: str, tensors: dict, inputs: dict) -> torch.Tensor:
    (y,) = run(model_from_state_dict(arch_text, tensors), inputs)
    return y


# ------------------------------------------------------------------------------ attention

QKV_INPUTS = "  q: {shape: [%d, %d], dtype: float64}\n  k: {shape: [%d, %d], dtype: float64}\n  v: {shape: [%d, %d], dtype: float64}"


def _attention_arch(T, h, kv, d, extra="", S=None) -> str:
    S = T if S is None else S
    return _arch(
        QKV_INPUTS % (T, h * d, S, kv * d, S, kv * d),
        f"  - {{name: attn, op: attention, in: [q, k, v], num_heads: {h}, num_kv_heads: {kv}, head_dim: {d}{extra}}}",
        "attn",
    )


def _reference_attention(q, k, v, h, kv, d, causal=True, scale=None):
    """One head at a time, with an explicit softmax: query head i reads kv head i // (h / kv)."""
    B, T, _ = q.shape
    S = k.shape[1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(B, T, h * d, dtype=q.dtype)
    for i in range(h):
        j = i // (h // kv)
        qi, kj, vj = q[..., i * d : (i + 1) * d], k[..., j * d : (j + 1) * d], v[..., j * d : (j + 1) * d]
        scores = qi @ kj.transpose(1, 2) * scale
        if causal:
            scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), -math.inf)
        out[..., i * d : (i + 1) * d] = torch.softmax(scores, dim=-1) @ vj
    return out


@pytest.mark.parametrize("h,kv", [(4, 4), (4, 2), (6, 2), (4, 1)])
def test_attention_matches_the_per_head_reference_gqa_mapping(h, kv):
    T, d = 5, 3
    q, k, v = _randn(2, T, h * d), _randn(2, T, kv * d), _randn(2, T, kv * d)
    got = _run1(_attention_arch(T, h, kv, d), {}, {"q": q, "k": k, "v": v})
    assert_close(got, _reference_attention(q, k, v, h, kv, d), 1e-12)


def test_attention_gqa_head_mapping_is_grouped_not_round_robin():
    """Query heads 0,1 read kv head 0 and 2,3 read kv head 1: changing kv head 1 moves only them."""
    T, h, kv, d = 4, 4, 2, 2
    q, k, v = _randn(1, T, h * d), _randn(1, T, kv * d), _randn(1, T, kv * d)
    arch = _attention_arch(T, h, kv, d)
    base = _run1(arch, {}, {"q": q, "k": k, "v": v})
    v2 = v.clone()
    v2[..., d:] += 1.0  # kv head 1 only
    moved = (_run1(arch, {}, {"q": q, "k": k, "v": v2}) - base).abs().amax(dim=(0, 1))
    assert torch.all(moved[: 2 * d] == 0) and torch.all(moved[2 * d :] > 0)


def test_attention_non_causal_and_explicit_scale():
    T, S, h, d = 3, 5, 2, 4
    q, k, v = _randn(2, T, h * d), _randn(2, S, h * d), _randn(2, S, h * d)
    got = _run1(_attention_arch(T, h, h, d, ", causal: false, scale: 0.7", S=S), {}, {"q": q, "k": k, "v": v})
    assert_close(got, _reference_attention(q, k, v, h, h, d, causal=False, scale=0.7), 1e-12)


def test_attention_defaults_kv_heads_and_head_dim_from_the_shapes():
    T, h, d = 4, 2, 3
    arch = _arch(QKV_INPUTS % (T, h * d, T, h * d, T, h * d), "  - {name: attn, op: attention, in: [q, k, v], num_heads: 2}", "attn")
    q, k, v = _randn(1, T, h * d), _randn(1, T, h * d), _randn(1, T, h * d)
    assert_close(_run1(arch, {}, {"q": q, "k": k, "v": v}), _reference_attention(q, k, v, h, h, d), 1e-12)


def test_rope_rotates_pairs_i_and_i_plus_half_by_position():
    T, d, theta = 6, 4, 100.0
    cos, sin = rope_tables(T, d, theta, torch.float64, "cpu")
    x = _randn(1, 1, T, d)
    got = apply_rope(x, cos, sin)
    for t in range(T):
        for i in range(d // 2):
            angle = t / theta ** (2 * i / d)
            a, b = x[0, 0, t, i], x[0, 0, t, i + d // 2]
            assert abs(float(got[0, 0, t, i] - (a * math.cos(angle) - b * math.sin(angle)))) < 1e-12
            assert abs(float(got[0, 0, t, i + d // 2] - (b * math.cos(angle) + a * math.sin(angle)))) < 1e-12


def test_attention_with_rope_equals_reference_on_rotated_q_and_k():
    T, h, kv, d, theta = 5, 4, 2, 4, 500.0
    q, k, v = _randn(2, T, h * d), _randn(2, T, kv * d), _randn(2, T, kv * d)
    got = _run1(_attention_arch(T, h, kv, d, ", rope: {theta: 500.0}"), {}, {"q": q, "k": k, "v": v})
    cos, sin = rope_tables(T, d, theta, torch.float64, "cpu")

    def rotate(x, n):
        heads = x.reshape(2, T, n, d).transpose(1, 2)
        return apply_rope(heads, cos, sin).transpose(1, 2).reshape(2, T, n * d)

    assert_close(got, _reference_attention(rotate(q, h), rotate(k, kv), v, h, kv, d), 1e-12)


def test_rope_tables_and_rotation_match_transformers():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    T, h, d, theta = 7, 2, 8, 12345.0
    cfg = LlamaConfig(hidden_size=h * d, num_attention_heads=h, head_dim=d, rope_theta=theta, max_position_embeddings=64)
    rotary = LlamaRotaryEmbedding(cfg)
    q, k = _randn(3, h, T, d, dtype=torch.float32), _randn(3, h, T, d, dtype=torch.float32)
    cos_hf, sin_hf = rotary(q, torch.arange(T)[None].expand(3, T))
    cos, sin = rope_tables(T, d, theta, torch.float32, "cpu")
    assert torch.equal(cos, cos_hf[0]) and torch.equal(sin, sin_hf[0])  # the same bits
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    assert torch.equal(apply_rope(q, cos, sin), q_hf) and torch.equal(apply_rope(k, cos, sin), k_hf)


def test_attention_output_range_is_the_hull_of_v():
    arch = parse_architecture(
        _arch(
            "  q: {shape: [4, 4], dtype: float32}\n  k: {shape: [4, 4], dtype: float32}\n  x: {shape: [4, 4], dtype: float32}",
            "  - {name: v, op: sigmoid, in: x}\n  - {name: attn, op: attention, in: [q, k, v], num_heads: 2}",
            "attn",
        )
    )
    ranges = value_ranges(model_from_state_dict(arch, {}))
    assert ranges["attn"] == ranges["v"] and ranges["attn"].lo >= 0 and ranges["attn"].hi <= 1


def test_attention_outputs_lie_in_the_claimed_range():
    """deepen trusts value_range: every output must lie inside it (here v in [0.5, 3])."""
    T, h, kv, d = 6, 4, 2, 4
    q, k = 5 * _randn(4, T, h * d), 5 * _randn(4, T, kv * d)
    v = 0.5 + 2.5 * torch.rand(4, T, kv * d, generator=G, dtype=torch.float64)
    y = _run1(_attention_arch(T, h, kv, d, ", rope: {theta: 10.0}"), {}, {"q": q, "k": k, "v": v})
    from n2nsurgery.ops import get_op

    claimed = get_op("attention").value_range([Interval(), Interval(), Interval(0.5, 3.0)], {})
    assert claimed.lo <= float(y.min()) and float(y.max()) <= claimed.hi


@pytest.mark.parametrize(
    "shapes,attrs,message",
    [
        ((4, 8, 4, 8, 4, 8), "num_heads: 3", "do not split into num_heads 3"),
        ((4, 8, 4, 8, 4, 8), "num_heads: 4, num_kv_heads: 3", "not a multiple of num_kv_heads 3"),
        ((4, 8, 4, 4, 4, 4), "num_heads: 4, num_kv_heads: 2, head_dim: 4", "q must be [T, 16]"),
        ((4, 8, 4, 6, 4, 4), "num_heads: 4, num_kv_heads: 2", "k must be [S, 4]"),
        ((4, 8, 4, 8, 3, 8), "num_heads: 2, causal: false", "k and v must have the same number of positions"),
        ((4, 8, 5, 8, 5, 8), "num_heads: 2", "causal attention needs q and k of the same length"),
        ((4, 6, 4, 6, 4, 6), "num_heads: 2, rope: {theta: 10000.0}", "even head_dim"),
    ],
)
def test_attention_shape_errors_name_the_node(shapes, attrs, message):
    t, a, s, b, u, c = shapes
    text = _arch(
        f"  q: {{shape: [{t}, {a}]}}\n  k: {{shape: [{s}, {b}]}}\n  v: {{shape: [{u}, {c}]}}",
        f"  - {{name: blk.attn, op: attention, in: [q, k, v], {attrs}}}",
        "blk.attn",
    )
    with pytest.raises(N2NError) as e:
        model_from_state_dict(text, {})
    assert "node 'blk.attn' (attention)" in str(e.value) and message in str(e.value)


def test_attention_needs_three_inputs_and_2d_values():
    qkv = "  q: {shape: [4, 8]}\n  k: {shape: [4, 8]}\n  v: {shape: [4, 8]}"
    with pytest.raises(N2NError, match="attention takes 3 inputs, got 2"):
        parse_architecture(_arch(qkv, "  - {name: a, op: attention, in: [q, k], num_heads: 2}", "a"))
    with pytest.raises(N2NError, match=r"input q must be \[positions, heads·head_dim\]"):
        model_from_state_dict(_arch("  q: {shape: [8]}\n  k: {shape: [4, 8]}\n  v: {shape: [4, 8]}", "  - {name: a, op: attention, in: [q, k, v], num_heads: 2}", "a"), {})


@pytest.mark.parametrize(
    "attrs,message",
    [
        ("", "attention needs attribute 'num_heads'"),
        ("num_heads: 0", "attribute num_heads must be at least 1"),
        ("num_heads: 2, causal: 1", "attribute causal must be true or false"),
        ("num_heads: 2, scale: 0", "attribute scale is out of range"),
        ("num_heads: 2, rope: 10000", "attribute rope must be a mapping"),
        ("num_heads: 2, rope: {base: 10000}", "attribute rope has unknown key 'base'"),
        ("num_heads: 2, rope: {style: rotate_half}", "attribute rope needs theta"),
        ("num_heads: 2, rope: {theta: -1}", "attribute rope theta is out of range"),
        ("num_heads: 2, rope: {theta: 10000, style: interleaved}", "style must be one of 'rotate_half'"),
    ],
)
def test_attention_attribute_errors(attrs, message):
    qkv = "  q: {shape: [4, 8]}\n  k: {shape: [4, 8]}\n  v: {shape: [4, 8]}"
    sep = ", " if attrs else ""
    with pytest.raises(N2NError) as e:
        parse_architecture(_arch(qkv, f"  - {{name: a, op: attention, in: [q, k, v]{sep}{attrs}}}", "a"))
    assert "node 'a'" in str(e.value) and message in str(e.value)


# ------------------------------------------------------------------------------ norms


def _norm_arch(op: str, d: int = 6, extra: str = "") -> str:
    return _arch(f"  x: {{shape: [3, {d}], dtype: float32}}", f"  - {{name: n, op: {op}, in: x{extra}}}", "n")


def test_layernorm_matches_torch_with_and_without_affine():
    x = _randn(2, 3, 6, dtype=torch.float32)
    w, b = _randn(6, dtype=torch.float32), _randn(6, dtype=torch.float32)
    got = _run1(_norm_arch("layernorm", extra=", eps: 0.01"), {"n.weight": w, "n.bias": b}, {"x": x})
    assert_close(got, F.layer_norm(x, (6,), w, b, 0.01), 0)
    got = _run1(_norm_arch("layernorm"), {}, {"x": x})
    assert_close(got, F.layer_norm(x, (6,), None, None, 1e-5), 0)


def test_rmsnorm_is_hf_llama_rmsnorm():
    x = _randn(2, 3, 6, dtype=torch.float32)
    w = _randn(6, dtype=torch.float32)
    got = _run1(_norm_arch("rmsnorm", extra=", eps: 0.01"), {"n.weight": w}, {"x": x})
    want = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 0.01))
    assert torch.equal(got, want)
    no_weight = _run1(_norm_arch("rmsnorm"), {}, {"x": x})
    assert_close(no_weight, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), 0)


def test_rmsnorm_keeps_float64_precision():
    x = _randn(2, 3, 6) * 1e3
    got = _run1(_norm_arch("rmsnorm").replace("float32", "float64"), {"n.weight": torch.ones(6, dtype=torch.float64)}, {"x": x})
    assert got.dtype == torch.float64
    assert_close(got, x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), 1e-13)


@pytest.mark.parametrize("op", ["layernorm", "rmsnorm"])
def test_norm_parameter_shape_error(op):
    with pytest.raises(N2NError) as e:
        model_from_state_dict(_norm_arch(op), {"n.weight": torch.ones(5)})
    assert f"node 'n' ({op}): weight must be [6] (one per feature of the last axis), got [5]" in str(e.value)


def test_norm_eps_must_be_a_number():
    with pytest.raises(N2NError, match="node 'n': attribute eps must be a finite number"):
        parse_architecture(_norm_arch("rmsnorm", extra=", eps: small"))


# ------------------------------------------------------------------------------ embeddings

IDS = "  ids: {shape: [5], dtype: int64, high: 10}"


def test_embedding_looks_up_rows():
    w = _randn(10, 4, dtype=torch.float32)
    ids = torch.randint(0, 10, (3, 5), generator=G)
    got = _run1(_arch(IDS, "  - {name: wte, op: embedding, in: ids}", "wte"), {"wte.weight": w}, {"ids": ids})
    assert torch.equal(got, w[ids])


def test_embedding_refuses_float_inputs_and_ids_outside_the_table():
    w = torch.zeros(10, 4)
    arch = _arch("  x: {shape: [5], dtype: float32}", "  - {name: wte, op: embedding, in: x}", "wte")
    with pytest.raises(N2NError, match="node 'wte' \\(embedding\\) failed on cpu: embedding reads integer token ids, got a float32"):
        _run1(arch, {"wte.weight": w}, {"x": torch.zeros(1, 5)})
    arch = _arch("  ids: {shape: [5], dtype: int64, high: 20}", "  - {name: wte, op: embedding, in: ids}", "wte")
    with pytest.raises(N2NError, match=r"token id 15 is outside the table's \[0, 10\); set the input's high to at most 10"):
        _run1(arch, {"wte.weight": w}, {"ids": torch.full((1, 5), 15)})


def test_embedding_weight_must_be_2d():
    with pytest.raises(N2NError, match=r"node 'wte' \(embedding\): weight must be 2-D \[vocab, d\], got \[10\]"):
        model_from_state_dict(_arch(IDS, "  - {name: wte, op: embedding, in: ids}", "wte"), {"wte.weight": torch.zeros(10)})


def test_position_embedding_gives_the_first_rows_and_adds():
    wte, wpe = _randn(10, 4, dtype=torch.float32), _randn(7, 4, dtype=torch.float32)
    nodes = "  - {name: wte, op: embedding, in: ids}\n  - {name: wpe, op: position_embedding, in: ids}\n  - {name: sum, op: add, in: [wte, wpe]}"
    ids = torch.randint(0, 10, (3, 5), generator=G)
    got = _run1(_arch(IDS, nodes, "sum"), {"wte.weight": wte, "wpe.weight": wpe}, {"ids": ids})
    assert torch.equal(got, wte[ids] + wpe[:5])


def test_position_embedding_table_too_short():
    with pytest.raises(N2NError) as e:
        model_from_state_dict(_arch(IDS, "  - {name: wpe, op: position_embedding, in: ids}", "wpe"), {"wpe.weight": torch.zeros(4, 3)})
    assert "node 'wpe' (position_embedding): the input has 5 positions but the table holds 4" in str(e.value)
    assert "use a sequence length of at most 4" in str(e.value)


# ------------------------------------------------------------------------------ linear_t, chunk


def test_linear_t_is_x_at_w_plus_b():
    x, w, b = _randn(2, 3, 4, dtype=torch.float32), _randn(4, 6, dtype=torch.float32), _randn(6, dtype=torch.float32)
    arch = _arch("  x: {shape: [3, 4]}", "  - {name: fc, op: linear_t, in: x}", "fc")
    assert_close(_run1(arch, {"fc.weight": w, "fc.bias": b}, {"x": x}), x @ w + b, 1e-6)
    assert_close(_run1(arch, {"fc.weight": w}, {"x": x}), x @ w, 1e-6)


def test_linear_t_weight_in_the_linear_layout_is_refused():
    arch = _arch("  x: {shape: [3, 4]}", "  - {name: fc, op: linear_t, in: x}", "fc")
    with pytest.raises(N2NError) as e:
        model_from_state_dict(arch, {"fc.weight": torch.zeros(6, 4)})
    assert "node 'fc' (linear_t): weight [6, 4] is [in, out] and expects 6 input features but the input has 4" in str(e.value)
    assert "belongs to op linear" in str(e.value)
    with pytest.raises(N2NError, match=r"bias must be \[6\], got \[4\]"):
        model_from_state_dict(arch, {"fc.weight": torch.zeros(4, 6), "fc.bias": torch.zeros(4)})


def test_chunk_splits_q_k_v():
    x = _randn(2, 3, 12)
    for i in range(3):
        arch = _arch("  x: {shape: [3, 12], dtype: float64}", f"  - {{name: p, op: chunk, in: x, chunks: 3, index: {i}}}", "p")
        assert torch.equal(_run1(arch, {}, {"x": x}), x[..., 4 * i : 4 * (i + 1)])


@pytest.mark.parametrize(
    "attrs,message",
    [
        ("chunks: 5, index: 0", "has 12 entries, which do not split into 5 equal parts"),
        ("chunks: 3, index: 3", "index 3 is out of range for 3 chunks (use 0..2)"),
        ("chunks: 3, index: 0, dim: 3", "dim 3 is out of range"),
    ],
)
def test_chunk_errors(attrs, message):
    with pytest.raises(N2NError) as e:
        model_from_state_dict(_arch("  x: {shape: [3, 12]}", f"  - {{name: p, op: chunk, in: x, {attrs}}}", "p"), {})
    assert "node 'p' (chunk)" in str(e.value) and message in str(e.value)


def test_chunk_keeps_the_value_range():
    arch = _arch("  x: {shape: [3, 12]}", "  - {name: r, op: relu, in: x}\n  - {name: p, op: chunk, in: r, chunks: 3, index: 1}", "p")
    assert value_ranges(model_from_state_dict(arch, {}))["p"] == Interval(0.0, math.inf)


def test_gelu_tanh_matches_hf_gelu_new():
    pytest.importorskip("transformers")
    from transformers.activations import NewGELUActivation

    x = torch.linspace(-8, 8, 20001)
    assert_close(F.gelu(x, approximate="tanh"), NewGELUActivation()(x), 1e-6)


# ------------------------------------------------------------------------------ no widening yet


@pytest.mark.parametrize(
    "example,layer,refused_at",
    [
        ("llama-tiny", "model.layers.0.self_attn.q_proj", "'model.layers.0.self_attn', op 'attention'"),
        ("llama-tiny", "model.layers.0.self_attn.v_proj", "'model.layers.0.self_attn', op 'attention'"),
    ],
)
def test_widening_into_the_new_ops_is_refused(example, layer, refused_at):
    model = load_model(str(RECIPES / f"{example}.safetensors"))
    group, refused = widen_group(model, layer)
    assert refused is not None and refused_at in refused and "declares no widening rule" in refused


def test_cli_widen_through_attention_exits_2_with_one_line(runner, tmp_path):
    out = tmp_path / "out.safetensors"
    r = runner.invoke(app, ["widen", str(RECIPES / "llama-tiny.safetensors"), "--layer", "model.layers.0.self_attn.k_proj", "--width", "32", "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "'attention' declares no widening rule" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


# ------------------------------------------------------------------------------ shipped examples


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    """The examples written afresh by a separate process: the bytes must not depend on anything
    this test session did."""
    folder = tmp_path_factory.mktemp("examples")
    subprocess.run([sys.executable, "-m", "n2nsurgery.examples_transformers", str(folder)], check=True)
    return folder


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_shipped_examples_are_regenerated_byte_for_byte(name, regenerated):
    for ext in ("safetensors", "yaml"):
        assert (regenerated / f"{name}.{ext}").read_bytes() == (RECIPES / f"{name}.{ext}").read_bytes()
    assert (RECIPES / f"{name}.safetensors").stat().st_size < 200_000


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_shipped_examples_inspect_and_verify(name, runner):
    ckpt = str(RECIPES / f"{name}.safetensors")
    r = runner.invoke(app, ["inspect", ckpt, "--json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["verify", ckpt, ckpt, "--json", "--probes", "8"])
    assert r.exit_code == 0, r.output


def test_llama_tiny_has_gqa_and_a_tied_head():
    model = load_model(str(RECIPES / "llama-tiny.safetensors"))
    attn = model.arch.node("model.layers.0.self_attn").resolved_attrs()
    assert (attn["num_heads"], attn["num_kv_heads"], attn["head_dim"]) == (4, 2, 8)
    assert model.arch.node("lm_head").param_key("weight") == "model.embed_tokens.weight"
    assert "lm_head.weight" not in model.tensors


# ------------------------------------------------------------------------------ hf_arch config checks

LLAMA = {
    "model_type": "llama", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
}
GPT2 = {"model_type": "gpt2", "vocab_size": 50, "n_positions": 16, "n_embd": 16, "n_layer": 2, "n_head": 4}


def test_arch_from_config_names_follow_hf_module_paths():
    arch = arch_from_config(dict(LLAMA, tie_word_embeddings=True), seq_len=12)
    names = arch.node_names()
    for name in ("model.embed_tokens", "model.layers.1.self_attn", "model.layers.1.self_attn.q_proj", "model.layers.1", "model.norm", "lm_head"):
        assert name in names
    assert arch.inputs["input_ids"].to_dict() == {"shape": [12], "dtype": "int64", "high": 50}
    assert arch.outputs == ["lm_head"]
    attn = arch.node("model.layers.0.self_attn").resolved_attrs()
    assert attn["rope"] == {"theta": 10000.0, "style": "rotate_half"} and attn["head_dim"] == 4
    gpt2 = arch_from_config(GPT2)
    assert {"transformer.wte", "transformer.wpe", "transformer.h.1.attn", "transformer.h.1.attn.c_attn", "transformer.h.1"} <= set(gpt2.node_names())
    assert gpt2.node("lm_head").params == {"weight": "transformer.wte.weight"}  # GPT-2 ties by default
    assert gpt2.inputs["input_ids"].shape == (8,)


def test_rope_theta_in_either_spelling():
    old = arch_from_config(dict(LLAMA, rope_theta=500000.0, rope_scaling=None))
    new = arch_from_config(dict(LLAMA, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))
    for arch in (old, new):
        assert arch.node("model.layers.0.self_attn").resolved_attrs()["rope"]["theta"] == 500000.0


def test_gpt2_scale_attn_weights_false_means_raw_scores():
    attrs = arch_from_config(dict(GPT2, scale_attn_weights=False)).node("transformer.h.0.attn").resolved_attrs()
    assert attrs["scale"] == 1.0


@pytest.mark.parametrize(
    "cfg,message",
    [
        ({"model_type": "bert"}, "model_type 'bert' is not supported; supported: gpt2, llama, mistral, qwen2"),
        (dict(LLAMA, rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
        (dict(LLAMA, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}), "rope_parameters.rope_type 'llama3' is not supported"),
        (dict(LLAMA, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}), "rope_parameters.partial_rotary_factor"),
        (dict(LLAMA, qk_norm=True), "qk_norm = True is not supported yet"),
        (dict(LLAMA, hidden_act="gelu_fast"), "hidden_act 'gelu_fast' is not supported"),
        (dict(LLAMA, num_key_value_heads=3), "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
        ({k: v for k, v in LLAMA.items() if k != "hidden_size"}, "needs hidden_size"),
        (dict(LLAMA, hidden_size=16.0), "hidden_size must be an integer"),
        (dict(LLAMA, model_type="mistral", sliding_window=4), "sliding_window 4 is shorter than the sequence length 8"),
        (dict(LLAMA, model_type="qwen2", use_sliding_window=True, sliding_window=4), "sliding_window 4"),
        (dict(GPT2, scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx = True is not supported yet"),
        (dict(GPT2, reorder_and_upcast_attn=True), "reorder_and_upcast_attn = True is not supported yet"),
        (dict(GPT2, n_positions=4), "sequence length 8 exceeds n_positions 4"),
        (dict(GPT2, n_head=5), "hidden size 16 does not split into 5 attention heads"),
    ],
)
def test_arch_from_config_refuses_what_it_cannot_compute(cfg, message):
    with pytest.raises(N2NError) as e:
        arch_from_config(cfg, seq_len=8)
    assert str(e.value).startswith("config.json: ") and message in str(e.value)


def test_sliding_window_as_long_as_the_sequence_is_full_attention():
    arch = arch_from_config(dict(LLAMA, model_type="mistral", sliding_window=4096))
    assert arch.node("model.layers.0.self_attn").resolved_attrs()["causal"] is True


def test_transformers_is_not_a_runtime_dependency():
    """The ops, hf_arch and the examples work where transformers cannot be imported."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((RECIPES.parent / "pyproject.toml").read_text())["project"]
    assert not any(dep.startswith("transformers") for dep in project["dependencies"])
    assert any(dep.startswith("transformers") for dep in project["optional-dependencies"]["test"])
    script = (
        "import sys; sys.modules['transformers'] = None\n"  # any import of it now fails
        "from n2nsurgery.examples_transformers import build_model\n"
        "from n2nsurgery.executor import run\n"
        "import torch\n"
        "(y,) = run(build_model('llama-tiny'), {'input_ids': torch.zeros(1, 8, dtype=torch.int64)})\n"
        "assert y.shape == (1, 8, 96)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
