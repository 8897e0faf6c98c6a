"""`n2n grow`: plan and run the widen and deepen steps that take a Hugging Face model to a target config.

:func:`plan_growth` compares the model's sizes (as its ``config.json`` would pin them) with the
target's and emits one step per field that grows, in an order where each step's layers exist
and have their final sizes before a later step copies them (residual stream, attention, MLP,
then new blocks)::

    {"field": "intermediate_size", "from": 32, "to": 64,
     "step": {"widen": {"layer": "model.layers.*.mlp.up_proj", "width": 64}}}
    {"field": "num_hidden_layers", "from": 2, "to": 4,
     "step": {"deepen": {"after": ["model.layers.0", "model.layers.1"], "block": "copy"}}}

:func:`run_step` runs one step through the runner :func:`_runner` picks for its kind: block
deepening, a widening (d_model through the embedding, the MLPs by a glob) or a head growth in
every attention node. Growing the KV heads brings their query groups along, so
``num_attention_heads`` follows unless the target names it. A field n2n cannot grow exactly
(GPT-2's n_embd and n_head: its fused c_attn ties them) is refused naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

from .errors import N2NError

# Sizes n2n grows, per family, in the order the steps run.
_LLAMA_FIELDS = ("hidden_size", "head_dim", "num_key_value_heads", "num_attention_heads", "intermediate_size", "num_hidden_layers")
_GPT2_FIELDS = ("n_embd", "n_head", "n_inner", "n_layer")
# Fields a growth never changes: a target that asks for another value cannot be reached exactly.
_FIXED = ("model_type", "vocab_size", "rms_norm_eps", "layer_norm_epsilon", "tie_word_embeddings", "hidden_act",
          "activation_function", "n_positions", "attention_bias", "mlp_bias", "rope_scaling")


@dataclass
class GrowStep:
    field: str  # the config field this step grows
    old: int
    new: int
    step: dict  # {"widen": {...}} or {"deepen": {...}}
    available: bool = True
    why: str = ""  # why not available

    def to_dict(self) -> dict:
        return {"field": self.field, "from": self.old, "to": self.new, "step": self.step, "available": self.available,
                **({"why": self.why} if self.why else {})}


@dataclass
class GrowPlan:
    family: str
    current: dict  # field -> size now
    target: dict  # field -> size asked for
    steps: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"family": self.family, "current": dict(self.current), "target": dict(self.target),
                "steps": [s.to_dict() for s in self.steps]}


def fields_of(family: str) -> tuple:
    return _GPT2_FIELDS if family == "gpt2" else _LLAMA_FIELDS


# ---------------------------------------------------------------------------------- targets


def parse_sets(values: list) -> dict:
    """``--set FIELD=VALUE`` options as {field: int}; a malformed one is refused."""
    out = {}
    for text in values:
        name, eq, value = text.partition("=")
        name = name.strip()
        if not eq or not name:
            raise N2NError(f"--set {text!r}: write FIELD=VALUE, e.g. --set intermediate_size=128")
        try:
            out[name] = int(value.strip())
        except ValueError:
            raise N2NError(f"--set {text!r}: {name} must be a whole number, got {value.strip()!r}") from None
    return out


def target_from_config(cfg: Mapping, current_cfg: Mapping, source: str) -> dict:
    """The sizes a target ``config.json`` asks for; a fixed field it changes is refused."""
    if not isinstance(cfg, Mapping):
        raise N2NError(f"{source}: a config must be a JSON object")
    for name in _FIXED:
        if name in cfg and cfg.get(name) != current_cfg.get(name) and not (name == "rope_scaling" and not cfg.get(name) and not current_cfg.get(name)):
            raise N2NError(f"{source}: {name} is {cfg.get(name)!r} but the model's is {current_cfg.get(name)!r}; "
                           f"n2n cannot change {name} (only {', '.join(fields_of(current_cfg.get('model_type')))} grow)")
    family = current_cfg.get("model_type")
    target = {name: cfg[name] for name in fields_of(family) if cfg.get(name) is not None}
    if family != "gpt2" and "head_dim" not in target and "hidden_size" in target:
        heads = cfg.get("num_attention_heads", current_cfg.get("num_attention_heads"))
        if isinstance(heads, int) and heads > 0 and target["hidden_size"] % heads == 0:
            target["head_dim"] = target["hidden_size"] // heads  # what transformers derives when absent
    return target


# ---------------------------------------------------------------------------------- planning


def plan_growth(model, target: Mapping, block: str = "copy", split: Optional[str] = None) -> GrowPlan:
    """The steps from `model` (read from a Hugging Face folder) to the sizes in `target`.

    Args:
        model: the teacher, read from a Hugging Face folder.
        target: {config field: size} (see :func:`parse_sets`, :func:`target_from_config`).
        block: new blocks are a ``copy`` of the block before (writers zero) or ``zero``.
        split: how the copied units of the steps that copy units (the MLP's, the heads') share
            their outgoing weights, as ``n2n widen --split``: None keeps each step's exact
            default (equal shares); ``"random"`` splits them in random proportions that sum to
            one (exact, and the copies no longer get identical gradients). The residual stream
            and head_dim have no copies (their new units are zero-padded), so it does not apply
            to them.

    Raises:
        N2NError: a field n2n cannot grow, a smaller or non-integer size, heads that do not
            divide; the message names the field.
    """
    from .hf_folder import student_config

    if getattr(model, "hf", None) is None:
        raise N2NError(f"{model.source}: n2n grow needs a Hugging Face model folder (config.json beside the tensors)")
    cfg = student_config(model)
    family = cfg.get("model_type")
    names = fields_of(family)
    current = {name: cfg.get(name) for name in names}
    for name, value in target.items():
        if name not in names:
            raise N2NError(f"cannot grow {name!r}: n2n grows {', '.join(names)} of a {family} model")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise N2NError(f"{name} must be a positive whole number, got {value!r}")
        if value < current[name]:
            raise N2NError(f"{name} {value} is smaller than the model's {current[name]}; n2n only grows a model (Net2Net adds units, it never removes them)")
    final = {**current, **target}
    if family != "gpt2" and "num_attention_heads" not in target and final["num_key_value_heads"] != current["num_key_value_heads"]:
        # the query groups come along with their KV heads (the config then says so)
        group = current["num_attention_heads"] // current["num_key_value_heads"]
        final["num_attention_heads"] = final["num_key_value_heads"] * group
    _check_heads(family, final)
    steps, now = [], dict(current)
    for name in names:
        if name == "num_attention_heads" and final["num_key_value_heads"] != current["num_key_value_heads"]:
            now[name] = _heads_after_kv_growth(current, final)
        if final[name] != now[name]:
            steps.append(_step(model, family, name, now[name], final[name], block, split))
            now[name] = final[name]
    return GrowPlan(family, current, dict(target), steps)


def _heads_after_kv_growth(current: dict, final: dict) -> int:
    """Query heads once the KV heads have grown: each new KV head is copied with its whole group
    of query heads, so the group size stays; fewer query heads than that cannot be reached."""
    group = current["num_attention_heads"] // current["num_key_value_heads"]
    after = final["num_key_value_heads"] * group
    if final["num_attention_heads"] < after:
        raise N2NError(
            f"num_attention_heads {final['num_attention_heads']} cannot be reached: growing num_key_value_heads to "
            f"{final['num_key_value_heads']} copies each KV head with its group of {group} query heads "
            f"({after} query heads), and n2n never removes heads; ask for num_attention_heads of at least {after}"
        )
    return after


def _check_heads(family: str, final: dict) -> None:
    if family == "gpt2":
        if final["n_embd"] % final["n_head"]:
            raise N2NError(f"n_head {final['n_head']} does not divide n_embd {final['n_embd']} (GPT-2's heads split the residual stream)")
        return
    if final["num_attention_heads"] % final["num_key_value_heads"]:
        raise N2NError(f"num_attention_heads {final['num_attention_heads']} is not a multiple of num_key_value_heads "
                       f"{final['num_key_value_heads']} (each kv head serves a whole group of query heads)")


# The fields whose growth copies units (MLP units, heads with their query groups): --split applies.
_COPYING = ("intermediate_size", "n_inner", "num_key_value_heads", "num_attention_heads", "n_head")


def _step(model, family: str, name: str, old: int, new: int, block: str, split: Optional[str] = None) -> GrowStep:
    gpt2 = family == "gpt2"
    attn = "transformer.h.*.attn" if gpt2 else "model.layers.*.self_attn"
    if name in ("num_hidden_layers", "n_layer"):
        step = {"deepen": {"after": _spread(model, new - old), "block": block}}
    elif name in ("hidden_size", "n_embd"):
        step = {"widen": {"layer": "transformer.wte" if gpt2 else "model.embed_tokens", "width": new}}
    elif name in ("intermediate_size", "n_inner"):
        step = {"widen": {"layer": "transformer.h.*.mlp.c_fc" if gpt2 else "model.layers.*.mlp.up_proj", "width": new}}
    else:
        option = {"num_attention_heads": "heads", "n_head": "heads", "num_key_value_heads": "kv_heads", "head_dim": "head_dim"}[name]
        step = {"widen": {"layer": attn, option: new}}
    if split is not None and name in _COPYING:  # only when asked: a default plan stays as it was
        step["widen"]["split"] = split
    why = _unavailable(family, name)
    return GrowStep(name, old, new, step, available=not why, why=why)


def _spread(model, count: int) -> list:
    """Blocks to insert `count` new ones after, spread evenly (every K-th when K divides)."""
    from .blocks import block_names

    names = block_names(model)
    n = len(names)
    return [names[max(0, (i + 1) * n // count - 1)] for i in range(count)]


# ---------------------------------------------------------------------------------- running


def _unavailable(family: str, name: str) -> str:
    """Why n2n cannot grow `name` of a `family` model ('' when it can)."""
    if family == "gpt2" and name in ("n_embd", "n_head"):
        return (f"growing {name} of a GPT-2 model is not available: its config ties n_embd to n_head × head_dim "
                "(the fused c_attn splits the residual stream into its heads), and n2n does not yet grow the heads "
                "of a fused c_attn; grow n_inner and n_layer, or write an n2n checkpoint with n2n widen --format n2n")
    return ""


def available(family: str, name: str) -> bool:
    """Whether this build can grow config field `name` of a `family` model."""
    return not _unavailable(family, name)


def run_step(model, step: GrowStep, seed: int = 0):
    """Run one planned step: ``(student, report dict, renames)`` (renames: deepen's)."""
    if not step.available:
        raise N2NError(step.why)
    kind, args = next(iter(step.step.items()))
    return _runner(kind, args)(model, args, seed)


def _runner(kind: str, args: dict):
    if kind == "deepen":
        return _run_deepen
    if kind == "widen" and {"layer", "width"} <= set(args) <= {"layer", "width", "split"}:
        return _run_widen
    if kind == "widen" and len(set(args) & set(_HEAD_OPTIONS)) == 1 and set(args) - set(_HEAD_OPTIONS) <= {"layer", "split"}:
        return _run_heads
    raise N2NError(f"a grow step {kind} {sorted(args)} is not available in this build")


_HEAD_OPTIONS = ("heads", "kv_heads", "head_dim")


def _run_widen(model, args: dict, seed: int):
    from .widen import widen_many

    # no split: each group's exact default (the residual stream through a norm: zero or average)
    options = {"split": args["split"]} if "split" in args else {}
    student, report = widen_many(model, [args["layer"]], args["width"], seed=seed, **options)
    return student, report.to_dict(), None


def _run_heads(model, args: dict, seed: int):
    """The same head growth in every attention node the step's glob names, one after another
    (a config has one size for all layers)."""
    from fnmatch import fnmatchcase

    from .widen import group_seed, widen_attention

    option = next(k for k in _HEAD_OPTIONS if k in args)
    names = [n for n in model.arch.node_names() if fnmatchcase(n, args["layer"])]
    if not names:
        raise N2NError(f"no attention node matches {args['layer']!r}")
    reports = []
    for k, name in enumerate(names):
        model, report = widen_attention(model, name, seed=group_seed(seed, k), split=args.get("split"), **{option: args[option]})
        reports.append(report.to_dict())
    return model, {"layers": names, option: args[option], "groups": reports}, None


def _run_deepen(model, args: dict, seed: int):
    from .blocks import deepen_blocks

    student, report = deepen_blocks(model, args["after"], args["block"], seed=seed)
    return student, report.to_dict(), report.renames


def verification_dict(result) -> Optional[dict]:
    """A verification as JSON, with its worst errors on top (``max_abs``, ``max_rel``)."""
    if result is None:
        return None
    return {"max_abs": result.max_abs, "max_rel": result.max_rel, **result.to_dict()}


def run_plan(teacher, plan: GrowPlan, *, seed: int = 0, verify: bool = True, on_step=None, **check) -> tuple:
    """Run every step of `plan`, each verified against the model before it (``check``: the
    options of :func:`~n2nsurgery.commit.commit`: probes, device, atol, rtol, outputs_only).

    Returns:
        ``(student, results, renames)``: results are one dict per step (the plan's step, the
        surgery's report, the verification), renames map the teacher's node names to the
        student's (for the end-to-end verification).
    """
    from .commit import commit

    for step in plan.steps:  # refuse before any work, not after the first steps
        if not step.available:
            raise N2NError(step.why)
    model, results = teacher, []
    where = {n: n for n in teacher.arch.node_names()}
    for i, step in enumerate(plan.steps, 1):
        student, report, renames = run_step(model, step, seed)
        done = commit(model, student, None, verify=verify, seed=seed, renames=renames,
                      what=f"grow step {i} ({step.field} {step.old} -> {step.new})", **check)
        where = {t: (renames or {}).get(now, now) for t, now in where.items()}
        result = {**step.to_dict(), "report": report, "verification": verification_dict(done.verification)}
        results.append(result)
        if on_step is not None:
            on_step(i, step, done.verification)
        model = student
    return model, results, {t: now for t, now in where.items() if t != now}
