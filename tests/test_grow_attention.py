"""Exact growth of attention (issue 14; docs/transformers.md): heads (MHA), kv heads with their query groups
(GQA), query heads per group, head_dim with rotary.

The oracle is transformers itself: a random-init Llama / Qwen2 / Mistral teacher from a tiny
config is exported with hf_arch, grown with n2n (every layer's attention, since a config has one
size for all), loaded with ``strict=True`` into the same class with the bigger config, and its
logits compared with the teacher's (max relative |Δ| ≤ 1e-5 in float32, eager and sdpa).
Negative controls remove one ingredient of a rule (θ, the q scale, the o_proj split) and must be
caught by the comparison with transformers and by n2n's own verification.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import RECIPES  # noqa: E402
from n2nsurgery import load_model, model_from_state_dict  # noqa: E402
from n2nsurgery.cli import app  # noqa: E402
from n2nsurgery.errors import N2NError  # noqa: E402
from n2nsurgery.examples_transformers import LLAMA_TINY_CONFIG  # noqa: E402
from n2nsurgery.executor import run  # noqa: E402
from n2nsurgery.hf_arch import arch_from_config  # noqa: E402
from n2nsurgery.verify import verify  # noqa: E402
from n2nsurgery.widen import plan_heads, widen_attention  # noqa: E402

transformers.logging.set_verbosity_error()

REL_TOL = 1e-5
IMPLS = ("eager", "sdpa")
SEQ = 10
# hidden 48: transformers 5 wants Llama's hidden_size to be a multiple of num_attention_heads
# (even with an explicit head_dim), so the grown head counts here divide 48.
BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=48, num_hidden_layers=2, rms_norm_eps=1e-2)

# name: (config class, model class, teacher fields)
TEACHERS = {
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(BASE, num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=500.0)),
    "llama-gqa-tied": ("LlamaConfig", "LlamaForCausalLM", dict(BASE, num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)),
    "llama-mha": ("LlamaConfig", "LlamaForCausalLM", dict(BASE, num_attention_heads=4, num_key_value_heads=4, head_dim=6)),
    "qwen2-biases": ("Qwen2Config", "Qwen2ForCausalLM", dict(BASE, num_attention_heads=4, num_key_value_heads=2, head_dim=8)),
    "mistral-mqa": ("MistralConfig", "MistralForCausalLM", dict(BASE, num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=None)),
}


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Norm gains off 1 and biases off 0, as after training (init values would hide bugs), and
    queries and keys large enough for sharp attention: at init (std 0.02) the softmax is nearly
    uniform, and a wrong rotary θ or score scale would hardly show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(25.0)


def _hf(config_cls: str, model_cls: str, fields: dict, impl: str):
    cfg = getattr(transformers, config_cls)(attn_implementation=impl, **fields)
    return getattr(transformers, model_cls)(cfg).eval()


def _teacher(name: str, impl: str = "sdpa"):
    config_cls, model_cls, fields = TEACHERS[name]
    torch.manual_seed(0)
    hf = _hf(config_cls, model_cls, fields, impl)
    _perturb(hf, 0)
    return hf, model_from_state_dict(arch_from_config(hf.config.to_dict(), seq_len=SEQ), hf.state_dict())


def _grow_every_layer(model, layers: int, **request):
    reports = []
    for i in range(layers):
        model, report = widen_attention(model, f"model.layers.{i}.self_attn", seed=i, **request)
        reports.append(report)
    return model, reports


def _student_fields(fields: dict, report) -> dict:
    """The teacher's config with the attention sizes the report says (hidden_size unchanged)."""
    new = report.heads["new"]
    out = dict(fields, num_attention_heads=new["num_heads"], num_key_value_heads=new["num_kv_heads"], head_dim=new["head_dim"])
    if "rope_theta" in new:
        out["rope_theta"] = new["rope_theta"]
    return out


def _state_dict(model, hf) -> dict:
    sd = {k: v.clone() for k, v in model.tensors.to_dict().items()}
    if "lm_head.weight" not in sd:  # a tied head: the state_dict of the HF class still names it
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def _hf_student(name: str, student, report, impl: str, **overrides):
    config_cls, model_cls, fields = TEACHERS[name]
    hf = _hf(config_cls, model_cls, dict(_student_fields(fields, report), **overrides), impl)
    hf.load_state_dict(_state_dict(student, hf), strict=True)
    return hf


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (5, SEQ), generator=torch.Generator().manual_seed(1))


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _logits(hf, ids) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids).logits


GROWTHS = [
    ("llama-gqa", dict(kv_heads=3)),  # GQA: kv heads 2 → 3, each with its 2 query heads (H 4 → 6)
    ("llama-gqa", dict(kv_heads=4, split="random")),
    ("llama-gqa", dict(kv_heads=4, split="tile")),
    ("llama-gqa", dict(kv_heads=3, split="zero")),
    ("llama-gqa", dict(heads=8)),  # query heads per group 2 → 4
    ("llama-gqa", dict(heads=6, split="random")),
    ("llama-gqa", dict(head_dim=12)),  # rotary: θ 500 → 500^1.5, q × √(12/8)
    ("llama-gqa", dict(head_dim=16)),
    ("llama-gqa-tied", dict(kv_heads=6)),
    ("llama-gqa-tied", dict(head_dim=10)),
    ("llama-mha", dict(heads=8)),  # MHA: every head grows, kv heads with it
    ("llama-mha", dict(head_dim=8)),
    ("qwen2-biases", dict(kv_heads=3)),
    ("qwen2-biases", dict(kv_heads=5, split="random")),  # 10 heads: Qwen2 does not ask 48 % heads  # q/k/v biases follow their rows
    ("qwen2-biases", dict(heads=6)),
    ("qwen2-biases", dict(head_dim=14)),
    ("mistral-mqa", dict(heads=6)),  # one kv head: query heads per group 4 → 6
    ("mistral-mqa", dict(kv_heads=2)),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,request_", GROWTHS, ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in r.items())}" for n, r in GROWTHS])
def test_grown_attention_loads_into_transformers_and_keeps_the_logits(name, request_, impl):
    hf, teacher = _teacher(name, impl)
    student, reports = _grow_every_layer(teacher, hf.config.num_hidden_layers, **request_)
    assert verify(teacher, student).passed
    ids = _ids(hf.config.vocab_size)
    reference = _logits(hf, ids)
    assert _max_rel(_logits(_hf_student(name, student, reports[-1], impl), ids), reference) <= REL_TOL
    (ours,) = run(student, {"input_ids": ids})
    assert _max_rel(ours, reference) <= REL_TOL


def test_report_and_attributes():
    _, teacher = _teacher("llama-gqa")
    student, report = widen_attention(teacher, "model.layers.0.self_attn", kv_heads=3)
    assert report.heads["old"] == {"num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "rope_theta": 500.0}
    assert report.heads["new"] == {"num_heads": 6, "num_kv_heads": 3, "head_dim": 8, "rope_theta": 500.0}
    assert (report.old_width, report.new_width, report.split) == (2, 3, "equal")
    assert report.attr_changes == {"model.layers.0.self_attn": {"num_heads": 6, "num_kv_heads": 3}}
    shapes = {c["key"]: c["new_shape"] for c in report.changes}
    assert shapes == {
        "model.layers.0.self_attn.q_proj.weight": [48, 48],
        "model.layers.0.self_attn.k_proj.weight": [24, 48],
        "model.layers.0.self_attn.v_proj.weight": [24, 48],
        "model.layers.0.self_attn.o_proj.weight": [48, 48],
    }
    assert student.history[-1]["args"] == {"layer": "model.layers.0.self_attn", "kv_heads": 3, "split": "equal"}
    assert "heads" in report.to_dict()

    _, report = widen_attention(teacher, "model.layers.0.self_attn", heads=8)  # query groups 2 → 4: k, v unchanged
    assert report.attr_changes == {"model.layers.0.self_attn": {"num_heads": 8}}
    assert [c["key"] for c in report.changes] == ["model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    assert report.group == ["model.layers.0.self_attn.q_proj"]

    _, report = widen_attention(teacher, "model.layers.0.self_attn", head_dim=12)
    assert report.heads["new"]["rope_theta"] == pytest.approx(500.0**1.5)
    assert report.split == "zero" and report.heads["fill"] == "zero"


def test_new_heads_copy_a_kv_head_with_its_whole_query_group():
    _, teacher = _teacher("llama-gqa")
    ctx, plan = plan_heads(teacher, "model.layers.0.self_attn", {"kv_heads": 4}, None, 3)
    q_rows, k_rows, _ = plan.inputs
    kv_src = k_rows.src.reshape(4, 8)[:, 0] // 8
    q_src = q_rows.src.reshape(8, 8)[:, 0] // 8
    assert torch.equal(q_src, torch.stack([kv_src * 2, kv_src * 2 + 1], 1).reshape(-1))


def test_head_dim_keeps_every_rotary_pair():
    """Old dim i (paired with i + d/2) lands at i or d′/2 + (i − d/2): still a pair d′/2 apart."""
    _, teacher = _teacher("llama-gqa")
    _, plan = plan_heads(teacher, "model.layers.0.self_attn", {"head_dim": 12}, None, 0)
    head = plan.inputs[0].src[:12]
    new = plan.inputs[0].new[:12]
    assert head[~new].tolist() == list(range(8))
    assert (~new).nonzero().flatten().tolist() == [0, 1, 2, 3, 6, 7, 8, 9]
    assert plan.q_gain == pytest.approx(1.5**0.5)


def test_split_zero_new_heads_write_nothing():
    _, teacher = _teacher("llama-gqa")
    student, _ = widen_attention(teacher, "model.layers.0.self_attn", kv_heads=3, split="zero")
    o = student.tensors.get("model.layers.0.self_attn.o_proj.weight")
    assert torch.equal(o[:, :32], teacher.tensors.get("model.layers.0.self_attn.o_proj.weight"))
    assert not o[:, 32:].any()  # heads 4, 5 (dims 32..47) are the new kv head's query group
    q = student.tensors.get("model.layers.0.self_attn.q_proj.weight")
    assert q[32:].abs().sum() > 0  # the new heads are copies, so they can train


def test_same_seed_same_bytes_and_seeds_differ():
    _, teacher = _teacher("llama-gqa")
    a, _ = widen_attention(teacher, "model.layers.0.self_attn", kv_heads=5, seed=1)
    b, _ = widen_attention(teacher, "model.layers.0.self_attn", kv_heads=5, seed=1)
    c, _ = widen_attention(teacher, "model.layers.0.self_attn", kv_heads=5, seed=2)
    key = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(a.tensors.get(key), b.tensors.get(key))
    assert not torch.equal(a.tensors.get(key), c.tensors.get(key))


# ------------------------------------------------------------------------------ negative controls


def _without(student, change) -> object:
    sd = {k: v.clone() for k, v in student.tensors.to_dict().items()}
    change(sd)
    return model_from_state_dict(student.arch, sd)


@pytest.mark.parametrize("impl", IMPLS)
def test_theta_left_unchanged_is_caught(impl):
    hf, teacher = _teacher("llama-gqa", impl)
    student, reports = _grow_every_layer(teacher, 2, head_dim=12)
    arch = student.arch.copy()
    for i in range(2):
        arch.node(f"model.layers.{i}.self_attn").attrs["rope"] = {"theta": 500.0, "style": "rotate_half"}
    assert not verify(teacher, student.replace(arch=arch)).passed
    ids = _ids(97)
    bad = _hf_student("llama-gqa", student, reports[-1], impl, rope_theta=500.0)
    assert _max_rel(_logits(bad, ids), _logits(hf, ids)) > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_q_not_scaled_is_caught(impl):
    hf, teacher = _teacher("qwen2-biases", impl)
    student, reports = _grow_every_layer(teacher, 2, head_dim=12)
    gain = 1.5**0.5

    def unscale(sd):
        for i in range(2):
            for role in ("weight", "bias"):
                sd[f"model.layers.{i}.self_attn.q_proj.{role}"] /= gain

    bad = _without(student, unscale)
    assert not verify(teacher, bad).passed
    ids = _ids(97)
    assert _max_rel(_logits(_hf_student("qwen2-biases", bad, reports[-1], impl), ids), _logits(hf, ids)) > 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_o_proj_columns_not_split_is_caught(impl):
    hf, teacher = _teacher("llama-gqa", impl)
    student, reports = _grow_every_layer(teacher, 2, kv_heads=3)
    plans = [plan_heads(teacher, f"model.layers.{i}.self_attn", {"kv_heads": 3}, None, i)[1] for i in range(2)]

    def gather_only(sd):  # the copied heads' columns copied whole instead of shared
        for i, plan in enumerate(plans):
            key = f"model.layers.{i}.self_attn.o_proj.weight"
            sd[key] = teacher.tensors.get(key)[:, plan.output.src].clone()

    bad = _without(student, gather_only)
    assert not verify(teacher, bad).passed
    ids = _ids(97)
    assert _max_rel(_logits(_hf_student("llama-gqa", bad, reports[-1], impl), ids), _logits(hf, ids)) > 1e-3


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "request_,split,needle",
    [
        (dict(kv_heads=2), None, "--kv-heads 2 is not larger than the current 2"),
        (dict(heads=4), None, "--heads 4 is not larger than the current 4"),
        (dict(heads=6, kv_heads=3), None, "give exactly one of --heads, --kv-heads, --head-dim"),
        ({}, None, "give exactly one of"),
        (dict(heads=7), None, "--heads 7 is not a multiple of the 2 kv heads"),
        (dict(head_dim=11), None, "--head-dim must be even (got 11)"),
        (dict(head_dim=12), "random", "--split random cannot grow head_dim exactly"),
        (dict(kv_heads=3), "average", "--split average cannot grow heads exactly"),
        (dict(kv_heads=3), "tile", "--kv-heads must be a multiple of 2 (got 3)"),
        (dict(kv_heads=0), None, "--kv-heads must be an integer > 0"),
    ],
)
def test_refusals_say_why_and_what_works(request_, split, needle):
    _, teacher = _teacher("llama-gqa")
    with pytest.raises(N2NError) as e:
        widen_attention(teacher, "model.layers.0.self_attn", split=split, **request_)
    assert needle in str(e.value)


def test_not_an_attention_is_refused():
    model = load_model(str(RECIPES / "llama-tiny.safetensors"))
    with pytest.raises(N2NError, match="is a linear, which has no heads"):
        widen_attention(model, "model.layers.0.self_attn.q_proj", heads=8)
    with pytest.raises(N2NError, match="no node named"):
        widen_attention(model, "model.layers.9.self_attn", heads=8)


def test_gpt2_fused_qkv_is_refused():
    model = load_model(str(RECIPES / "gpt2-tiny.safetensors"))
    with pytest.raises(N2NError, match="n_embd must equal heads × head_dim"):
        widen_attention(model, "transformer.h.0.attn", heads=8)


def test_a_plain_width_on_a_projection_points_to_the_head_options():
    model = load_model(str(RECIPES / "llama-tiny.safetensors"))
    from n2nsurgery.widen import widen

    with pytest.raises(N2NError, match="--layer model.layers.0.self_attn with --heads N, --kv-heads N or --head-dim N"):
        widen(model, "model.layers.0.self_attn.q_proj", 40)


# ------------------------------------------------------------------------------ CLI and recipes


def _llama_tiny_hf(fields: dict, impl: str = "sdpa"):
    cfg = {k: v for k, v in LLAMA_TINY_CONFIG.items() if k not in ("model_type", "architectures")}
    cfg.update(fields)
    return _hf("LlamaConfig", "LlamaForCausalLM", cfg, impl)


def _compare_with_teacher(path: str, fields: dict) -> float:
    teacher = _llama_tiny_hf({})
    teacher.load_state_dict(_state_dict(load_model(str(RECIPES / "llama-tiny.safetensors")), teacher), strict=True)
    student = _llama_tiny_hf(fields)
    student.load_state_dict(_state_dict(load_model(path), student), strict=True)
    ids = _ids(96)
    return _max_rel(_logits(student, ids), _logits(teacher, ids))


def test_cli_widen_kv_heads_then_json(runner, tmp_path):
    src = str(RECIPES / "llama-tiny.safetensors")
    mid, out = tmp_path / "mid.safetensors", tmp_path / "out.safetensors"
    r = runner.invoke(app, ["widen", src, "--layer", "model.layers.0.self_attn", "--kv-heads", "4", "-o", str(mid)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["widen", str(mid), "--layer", "model.layers.1.self_attn", "--kv-heads", "4", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["heads"]["new"]["num_kv_heads"] == 4 and report["heads"]["new"]["num_heads"] == 8
    assert _compare_with_teacher(str(out), dict(num_attention_heads=8, num_key_value_heads=4)) <= REL_TOL


def test_recipe_grows_head_dim_in_every_layer(runner, tmp_path):
    recipe = tmp_path / "grow.yaml"
    recipe.write_text(
        "seed: 0\nsteps:\n"
        "  - widen: {layer: model.layers.0.self_attn, head_dim: 12}\n"
        "  - widen: {layer: model.layers.1.self_attn, head_dim: 12}\n"
    )
    out = tmp_path / "out.safetensors"
    r = runner.invoke(app, ["apply", str(RECIPES / "llama-tiny.safetensors"), str(recipe), "-o", str(out)])
    assert r.exit_code == 0, r.output
    theta = 10000.0**1.5
    assert load_model(str(out)).arch.node("model.layers.1.self_attn").attrs["rope"]["theta"] == pytest.approx(theta)
    assert _compare_with_teacher(str(out), dict(head_dim=12, rope_parameters={"rope_type": "default", "rope_theta": theta})) <= REL_TOL


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--heads", "8", "--width", "40"], "either --width"),
        ([], "give --width"),
        (["--heads", "8", "--kv-heads", "4"], "give exactly one of --heads, --kv-heads, --head-dim"),
        (["--heads", "7"], "is not a multiple of the 2 kv heads"),
        (["--head-dim", "9"], "--head-dim must be even"),
        (["--kv-heads", "4", "--noise", "0.1"], "--noise applies to --width"),
    ],
)
def test_cli_usage_errors_are_one_line(runner, tmp_path, args, needle):
    out = tmp_path / "out.safetensors"
    r = runner.invoke(app, ["widen", str(RECIPES / "llama-tiny.safetensors"), "--layer", "model.layers.0.self_attn", *args, "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and needle in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "step,needle",
    [
        ("{layer: model.layers.0.self_attn}", "give width, or one of heads, kv_heads, head_dim"),
        ("{layer: model.layers.0.self_attn, heads: 8, width: 3}", "either width"),
        ("{layer: model.layers.0.self_attn, heads: two}", "heads must be an integer > 0"),
    ],
)
def test_recipe_step_errors(runner, tmp_path, step, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"steps:\n  - widen: {step}\n")
    r = runner.invoke(app, ["apply", str(RECIPES / "llama-tiny.safetensors"), str(recipe), "-o", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 2, r.output
    assert needle in r.stderr, r.stderr


def test_head_dim_refused_when_the_queries_have_another_reader():
    """q × √(d′/d) is for the attention alone: another reader of q_proj would see it."""
    from n2nsurgery.arch import Node

    model = load_model(str(RECIPES / "llama-tiny.safetensors"))
    arch = model.arch.copy()
    arch.nodes.append(Node("probe", "linear", ["model.layers.0.self_attn.q_proj"]))
    arch.outputs.append("probe")
    sd = dict(model.tensors.to_dict(), **{"probe.weight": torch.randn(3, 32)})
    tapped = model_from_state_dict(arch, sd)
    with pytest.raises(N2NError, match="are also read by probe"):
        widen_attention(tapped, "model.layers.0.self_attn", head_dim=12)
    student, _ = widen_attention(tapped, "model.layers.0.self_attn", kv_heads=3)  # no gain: the reader takes shares
    assert verify(tapped, student).passed


def test_mha_written_without_num_kv_heads_or_head_dim_stays_so():
    """An attention whose YAML leaves num_kv_heads and head_dim to their defaults (= num_heads,
    q width / num_heads) keeps them implicit: only num_heads is written."""
    _, teacher = _teacher("llama-mha")
    arch = teacher.arch.copy()
    for i in range(2):
        attrs = arch.node(f"model.layers.{i}.self_attn").attrs
        del attrs["num_kv_heads"], attrs["head_dim"]
    implicit = teacher.replace(arch=arch)
    student, report = widen_attention(implicit, "model.layers.0.self_attn", heads=6)
    assert report.attr_changes == {"model.layers.0.self_attn": {"num_heads": 6}}
    assert report.heads["new"] == {"num_heads": 6, "num_kv_heads": 6, "head_dim": 6, "rope_theta": 10000.0}
    assert verify(implicit, student).passed
    student, report = widen_attention(implicit, "model.layers.1.self_attn", head_dim=10)
    assert set(report.attr_changes["model.layers.1.self_attn"]) == {"rope"}
    assert verify(implicit, student).passed


@pytest.mark.parametrize("request_", [dict(kv_heads=3), dict(heads=8, split="random"), dict(head_dim=32)])
def test_half_precision_stays_within_its_tolerance(request_):
    model = load_model(str(RECIPES / "llama-tiny.safetensors"))
    half = model_from_state_dict(model.arch, {k: v.to(torch.bfloat16) for k, v in model.tensors.to_dict().items()})
    student, _ = widen_attention(half, "model.layers.1.self_attn", **request_)
    assert student.tensors.dtype("model.layers.1.self_attn.q_proj.weight") == torch.bfloat16
    assert verify(half, student).passed
