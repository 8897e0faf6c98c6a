"""Recipes (docs/commands.md#recipes-n2n-apply): a reviewed, rerunnable list of surgery steps, applied and verified in order.

A recipe is a small YAML file::

    seed: 0
    steps:
      - widen:  {layer: conv1, width: 64}
      - widen:  {layer: conv2, width: 128, split: random}
      - deepen: {after: relu2, op: conv, kernel_size: 3, batchnorm: true}
    verify: {probes: 64}

Validation is strict, because a silently ignored key is a surgery the user thinks happened: an
unknown or misspelt key is an error that names it and suggests the right one, and a value of the
wrong type is an error that names the step (``step 2 (widen): width must be an integer > 0,
got 'abc'``). Nothing runs until the whole file has been checked.

Seeds. Each step gets its own seed, derived from the recipe's seed and the step's position with
:func:`step_seed` (a hash, so neighbouring recipe seeds do not share steps' seeds), unless the step
names one itself (``seed: 7`` inside the step), which makes that step reproduce
``n2n widen ... --seed 7`` exactly. The seed a step used is printed in the summary and recorded in
the student's ``n2n.history``. It drives both the surgery's random choices and that step's
verification probes, as ``--seed`` does for a single command.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional


from .errors import N2NError, VerificationFailed, did_you_mean
from .inputs import read_limited
from .yamlio import MAX_YAML_BYTES, decode_text, parse_yaml, read_text_file

_TOP_KEYS = ("seed", "steps", "verify", "description")
_VERIFY_KEYS = ("probes", "atol", "rtol", "device")
_KINDS = ("widen", "deepen")
_SPLITS = ("equal", "random", "zero", "average", "tile")  # widen.SPLIT_WORDS (no torch here)
_DEEPEN_OPS = ("auto", "linear", "conv", "residual")
_BLOCKS = ("copy", "zero")  # deepen block: (n2nsurgery.blocks)
_DEVICES = ("auto", "cpu", "cuda")


# ------------------------------------------------------------------------------- data


@dataclass
class VerifySettings:
    """How each step is checked: ``verify:`` in the recipe (``false`` turns checking off)."""

    enabled: bool = True
    probes: int = 64
    atol: Optional[float] = None  # None: the default for the checkpoint's dtype (docs/commands.md#verify)
    rtol: Optional[float] = None
    device: str = "auto"


@dataclass
class Step:
    """One step of a recipe: ``kind`` is ``widen`` or ``deepen``; ``args`` are its keyword arguments."""

    index: int  # 1-based, as messages and the summary number steps
    kind: str
    args: dict  # validated; only the keys the recipe wrote (the surgery fills in its defaults)
    seed: Optional[int] = None  # the step's own seed, when the recipe names one

    @property
    def target(self) -> str:
        """The node the step works on: the widened layer, or the node a layer is inserted after."""
        if self.kind == "deepen":
            return self.args["after"]
        layer = self.args["layer"]  # a name, a glob, or a list of them
        return layer if isinstance(layer, str) else ", ".join(layer)

    @property
    def label(self) -> str:
        """How messages name the step: ``step 2 (widen conv2)``."""
        return f"step {self.index} ({self.kind} {self.target})"


@dataclass
class Recipe:
    seed: int
    steps: list  # of Step
    verify: VerifySettings = field(default_factory=VerifySettings)
    description: Optional[str] = None
    source: str = "<recipe>"  # file name, for messages and history
    sha256: Optional[str] = None  # of the recipe text, recorded in history


@dataclass
class StepReport:
    """What one applied step did and how far its student was from the step's teacher."""

    index: int
    kind: str
    target: str
    args: dict
    seed: int
    changes: dict  # diff of the step's teacher and student (see n2nsurgery.diff)
    report: Optional[dict]  # the surgery's own report (WidenReport/DeepenReport .to_dict())
    verification: Optional[object] = None  # VerifyResult, or None when not verified
    # Widen with noise: how far the noise moved the outputs ({"max_abs", "max_rel"}).
    noise_deviation: Optional[dict] = None
    # Last step only: the final student checked against the recipe's original teacher. After a
    # noisy step with no tolerance in the recipe it is measured, not judged (end_to_end_judged).
    end_to_end: Optional[object] = None
    end_to_end_judged: bool = True

    @property
    def summary(self) -> str:
        """One line saying what changed, e.g. ``+2 nodes (conv_new, relu_new); 6 tensors reshaped``."""
        from .diff import summarize

        head = ""
        r = self.report or {}
        if self.kind == "widen" and "old_width" in r:
            head = f"{self.target} {r['old_width']} → {r['new_width']}"
            others = [g for g in r.get("group", []) if g != self.target]
            head += f" (with {', '.join(others)})" if others else ""
            head += "; "
        return head + summarize(self.changes)

    def to_dict(self) -> dict:
        return {
            "step": self.index,
            "kind": self.kind,
            "target": self.target,
            "args": dict(self.args),
            "seed": self.seed,
            "summary": self.summary,
            "changes": self.changes,
            "report": self.report,
            "verification": result_dict(self.verification),
            "noise_deviation": self.noise_deviation,
            "end_to_end": result_dict(self.end_to_end, self.end_to_end_judged),
        }


def result_dict(result, judged: bool = True) -> Optional[dict]:
    """A VerifyResult as JSON, with its overall max absolute and relative errors on top.

    ``judged: false`` marks a figure that was measured but not held to a tolerance (the final
    check after a noisy step, when the recipe gives no tolerance).
    """
    if result is None:
        return None
    return {**result.to_dict(), "max_abs": result.max_abs, "max_rel": result.max_rel, "judged": judged}


# ---------------------------------------------------------------------------- seeds


def step_seed(recipe_seed: int, index: int) -> int:
    """The seed of step `index` (1-based) of a recipe with seed `recipe_seed`.

    The first 4 bytes of ``sha256("n2n-recipe:<recipe_seed>:<index>")``, as a little-endian
    integer with the top bit cleared (so it fits every seed API: 0 <= seed < 2**31).

    Example:
        >>> step_seed(0, 1) == step_seed(0, 1) != step_seed(0, 2)
        True
    """
    digest = hashlib.sha256(f"n2n-recipe:{recipe_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# -------------------------------------------------------------------------- parsing


def load_recipe(path: str) -> Recipe:
    """Read and validate a recipe file; ``-`` reads standard input.

    Raises:
        N2NError: the file is missing or unreadable, or the recipe is not valid (the message
            names the file, the step and the key).

    Example:
        >>> r = load_recipe("recipes/cnn-wider-deeper.yaml")
        >>> [s.kind for s in r.steps]
        ['widen', 'widen', 'deepen']
    """
    if path == "-":  # the recipe itself piped in (the checkpoint then comes from a file)
        import sys

        if sys.stdin is None or sys.stdin.isatty():
            raise N2NError("standard input is a terminal: pipe a recipe into '-' or give a file path")
        raw = read_limited(sys.stdin.buffer, MAX_YAML_BYTES, "<stdin>", "a recipe YAML file")  # not /dev/zero's all
        if not raw.strip():
            raise N2NError("standard input is empty: no recipe was piped in")
        path = "<stdin>"
        return parse_recipe(decode_text(raw, path, "a recipe YAML file"), source=path)
    return parse_recipe(read_text_file(path, "a recipe YAML file"), source=path)


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Parse and strictly validate recipe YAML text (docs/commands.md#recipes-n2n-apply).

    Args:
        text: the YAML.
        source: the file name messages and history name.

    Returns:
        A :class:`Recipe`.

    Raises:
        N2NError: naming `source`, and the step and key at fault.

    Example:
        >>> parse_recipe("steps: [{widen: {layer: fc1, width: 64}}]").steps[0].args
        {'layer': 'fc1', 'width': 64}
    """

    def fail(msg):
        raise N2NError(f"{source}: {msg}")

    doc = parse_yaml(text, source)  # strict: a key written twice is an error, not the last one
    if not isinstance(doc, dict):
        fail("a recipe must be a YAML mapping with steps (and optionally seed and verify)")
    for k in doc:
        if k not in _TOP_KEYS:
            fail(f"unknown top-level key {k!r}{did_you_mean(str(k), _TOP_KEYS)} (keys: {', '.join(_TOP_KEYS)})")

    seed = doc.get("seed", 0)
    if not _is_int(seed) or seed < 0:
        fail(f"seed must be an integer >= 0, got {seed!r}")
    if seed >= SEED_LIMIT:
        fail(f"seed must be below 2**63 (a 64-bit signed integer), got {seed!r}")
    description = doc.get("description")
    if description is not None and not isinstance(description, str):
        fail(f"description must be a string, got {description!r}")

    raw_steps = doc.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        fail("steps must be a non-empty list, each item {widen: {...}} or {deepen: {...}}")
    steps = [_parse_step(i + 1, item, fail) for i, item in enumerate(raw_steps)]

    return Recipe(
        seed=seed,
        steps=steps,
        verify=_parse_verify(doc.get("verify", True), fail),
        description=description,
        source=source,
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
    )


SEED_LIMIT = 2**63  # seeds are 0 <= seed < SEED_LIMIT, as torch's generators take them (a signed 64-bit int)
_SEED_RANGE = "an integer from 0 to 2**63 - 1"


def _is_seed(v) -> bool:
    return _is_int(v) and 0 <= v < SEED_LIMIT


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_verify(raw, fail) -> VerifySettings:
    if isinstance(raw, bool):
        return VerifySettings(enabled=raw)
    if raw is None:
        return VerifySettings()
    if not isinstance(raw, dict):
        fail(f"verify must be true, false or a mapping with {', '.join(_VERIFY_KEYS)}; got {raw!r}")
    for k in raw:
        if k not in _VERIFY_KEYS:
            fail(f"verify: unknown key {k!r}{did_you_mean(str(k), _VERIFY_KEYS)} (keys: {', '.join(_VERIFY_KEYS)})")
    out = VerifySettings()
    if "probes" in raw:
        if not _is_int(raw["probes"]) or raw["probes"] < 1:
            fail(f"verify: probes must be an integer > 0, got {raw['probes']!r}")
        out.probes = raw["probes"]
    for k in ("atol", "rtol"):
        if k in raw:
            if not _is_number(raw[k]) or raw[k] < 0:
                fail(f"verify: {k} must be a number >= 0, got {raw[k]!r}")
            setattr(out, k, float(raw[k]))
    if "device" in raw:
        if raw["device"] not in _DEVICES:
            fail(f"verify: device must be one of {', '.join(_DEVICES)}, got {raw['device']!r}")
        out.device = raw["device"]
    return out


# Per kind: key -> (check, description for the message). Checks return True when the value is
# acceptable. Required keys are listed separately.
def _positive_int(v) -> bool:
    return _is_int(v) and v > 0


def _odd_positive_int(v) -> bool:
    return _is_int(v) and v > 0 and v % 2 == 1


def _name(v) -> bool:
    return isinstance(v, str) and bool(v)


def _layers(v) -> bool:
    return _name(v) or (isinstance(v, list) and bool(v) and all(_name(x) for x in v))


_STEP_KEYS = {
    "widen": {
        "layer": (_layers, "a node name, a glob (model.layers.*.mlp.up_proj) or a list of them"),
        "width": (_positive_int, "an integer > 0"),
        "heads": (_positive_int, "an integer > 0"),  # attention: query heads
        "kv_heads": (_positive_int, "an integer > 0"),
        "head_dim": (_positive_int, "an integer > 0"),
        "split": (lambda v: v in _SPLITS, "one of " + ", ".join(_SPLITS)),
        "noise": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
        "seed": (_is_seed, _SEED_RANGE),
    },
    "deepen": {
        "after": (_name, "a node name"),
        "op": (lambda v: v in _DEEPEN_OPS, "one of " + ", ".join(_DEEPEN_OPS)),
        "activation": (lambda v: v is None or _name(v), "an activation op name (relu, tanh, ...) or none"),
        "kernel_size": (_odd_positive_int, "an odd integer > 0"),
        "batchnorm": (lambda v: isinstance(v, bool), "true or false"),
        "hidden": (lambda v: v is None or _positive_int(v), "an integer > 0"),
        "name": (_name, "a node name"),
        "block": (lambda v: v in _BLOCKS, "one of " + ", ".join(_BLOCKS)),
        "seed": (_is_seed, _SEED_RANGE),
    },
}
_REQUIRED = {"widen": ("layer",), "deepen": ("after",)}
_HEAD_KEYS = ("heads", "kv_heads", "head_dim")  # a widen step of an attention node: one of these


def _check_widen_size(where: str, body: dict, fail) -> None:
    """A widen step gives `width` (a layer's units) or a size of an attention node's heads."""
    heads = [k for k in _HEAD_KEYS if k in body]
    if "width" in body and heads:
        fail(f"{where}: give either width (a linear or conv layer's units) or {', '.join(heads)} (an attention node's heads), not both")
    if "width" not in body and not heads:
        fail(f"{where}: missing 'width' (an integer > 0): give width, or one of {', '.join(_HEAD_KEYS)} for an attention node")
    if heads and "noise" in body:
        fail(f"{where}: noise applies to width only; growing heads is exact (split: random breaks the symmetry of copied heads)")


def _parse_step(index: int, item, fail) -> Step:
    where = f"step {index}"
    if not isinstance(item, dict) or len(item) != 1:
        got = f"keys {', '.join(map(repr, item))}" if isinstance(item, dict) and item else repr(item)
        fail(f"{where}: a step is a mapping with exactly one key, widen or deepen (e.g. - widen: {{layer: fc1, width: 64}}); got {got}")
    (kind, body), = item.items()
    if kind not in _KINDS:
        fail(f"{where}: unknown step kind {kind!r}{did_you_mean(str(kind), _KINDS)} (kinds: {', '.join(_KINDS)})")
    where = f"step {index} ({kind})"
    if not isinstance(body, dict):
        fail(f"{where}: expected a mapping of arguments, e.g. {{{', '.join(k + ': ...' for k in _REQUIRED[kind])}}}; got {body!r}")
    allowed = _STEP_KEYS[kind]
    for k in body:
        if k not in allowed:
            fail(f"{where}: unknown key {k!r}{did_you_mean(str(k), allowed)} (keys: {', '.join(allowed)})")
    for k in _REQUIRED[kind]:
        if k not in body:
            fail(f"{where}: missing {k!r} ({allowed[k][1]})")
    if kind == "widen":
        _check_widen_size(where, body, fail)
    args = {}
    for k, v in body.items():
        check, wanted = allowed[k]
        if not check(v):
            fail(f"{where}: {k} must be {wanted}, got {v!r}")
        args[k] = float(v) if k == "noise" else v
    own_seed = args.pop("seed", None)
    # `activation: null` / `hidden: null` mean "the default", as leaving them out does.
    args = {k: v for k, v in args.items() if v is not None}
    return Step(index=index, kind=kind, args=args, seed=own_seed)


# ---------------------------------------------------------------------------- applying


def apply_recipe(
    model,
    recipe: Recipe,
    *,
    seed: Optional[int] = None,
    verify: Optional[bool] = None,
    device: Optional[str] = None,
    on_step: Optional[Callable[[StepReport], None]] = None,
    out: Optional[str] = None,
    dry_run: bool = False,
    outputs_only: bool = False,
    max_shard_size: Optional[int] = None,
    overwrite_input: bool = False,
    allow_nonfinite: bool = False,
):
    """Run every step of `recipe` on `model`, in order, verifying each against the step before.

    The recipe goes through the same safety chain as a single surgery (:mod:`n2nsurgery.commit`):
    `out` and the teacher's finiteness are checked before the first step; each step calls
    :func:`n2nsurgery.widen.widen` or :func:`n2nsurgery.deepen.deepen` with the step's arguments
    and seed (:func:`step_seed`), then (unless verification is off) :func:`~n2nsurgery.commit.commit`
    checks the new model against the previous one, outputs and the values inside. When there is
    more than one step, the final student is also checked against the original `model`, so errors
    that pass step by step cannot add up unnoticed. The first failure raises and writes nothing;
    when every step passed, the final student is written to `out` (unless `dry_run`).

    Args:
        model: the teacher (:class:`~n2nsurgery.model.Model`); never modified.
        recipe: from :func:`load_recipe` or :func:`parse_recipe`.
        seed: overrides the recipe's seed (steps with their own seed keep it).
        verify: overrides the recipe's ``verify`` on/off.
        device: overrides the recipe's verification device (``auto``, ``cpu``, ``cuda``).
        on_step: called with each :class:`StepReport` as soon as its step passes (progress).
        out: where to write the final student (None: nowhere; see :func:`~n2nsurgery.commit.commit`).
        dry_run: check `out` and run every step, but write nothing.
        outputs_only: verify the outputs only, not the values inside the models.
        max_shard_size, overwrite_input, allow_nonfinite: as for :func:`~n2nsurgery.commit.commit`.

    Returns:
        ``(student, reports)``: the final model, whose ``history`` ends with one entry per step,
        and one :class:`StepReport` per step (the last one's ``end_to_end`` holds the check of
        the final student against `model`, when it ran).

    Raises:
        N2NError: a step cannot be done exactly (bad layer, refused widening, ...); the message
            starts with the step, e.g. ``step 2 (widen conv2): ...``. Also: `out` or the teacher
            is refused before the first step.
        VerificationFailed: a step's student (or the final one) is not the teacher's function.

    Example:
        >>> teacher = n2n.load_model("recipes/cnn.safetensors", "recipes/cnn.yaml")
        >>> student, reports = apply_recipe(teacher, load_recipe("recipes/cnn-wider-deeper.yaml"))
        >>> [r.kind for r in reports]
        ['widen', 'widen', 'deepen']
    """
    from .commit import commit, preflight
    from .diff import diff_models
    from .surgery import history_step

    write = dict(max_shard_size=max_shard_size, overwrite_input=overwrite_input, extra_inputs=[recipe.source])
    preflight(model, out, allow_nonfinite=allow_nonfinite, **write)  # refused before the steps run
    base_seed = recipe.seed if seed is None else seed
    checking = recipe.verify.enabled if verify is None else verify
    settings = recipe.verify
    dev = device or settings.device
    recipe_ref = {"file": os.path.basename(recipe.source), "sha256": recipe.sha256, "steps": len(recipe.steps)}

    current = model
    reports = []
    renames: dict = {}  # the original teacher's node names -> the current ones, where steps renamed them
    noisy = False  # a step added the paper's noise: the chain is no longer exact by design
    for step in recipe.steps:
        s = step.seed if step.seed is not None else step_seed(base_seed, step.index)
        before = len(current.history)
        try:
            student, surgery_report = _run_step(current, step, s)
        except VerificationFailed:
            raise
        except N2NError as e:  # name the step: the message from widen/deepen names only the node
            raise N2NError(f"{step.label}: {e}") from None
        if len(student.history) == before:  # the surgery left the record to its caller: add it
            student.history = student.history + [history_step(step.kind, step.args, s)]  # a new list: never the teacher's
        # Say where the step came from, so the lineage reads back as one run of one recipe.
        student.history[-1] = dict(student.history[-1], command="apply", recipe=dict(recipe_ref, step=step.index))
        noise_free = getattr(surgery_report, "noise_free", None)
        # The original teacher's parameters were checked above; each step's teacher derives from it.
        step_renames = getattr(surgery_report, "renames", None)  # a block deepening renumbers nodes
        checked = commit(current, student, None, verify=checking, probes=settings.probes, seed=s, device=dev,
                         atol=settings.atol, rtol=settings.rtol, outputs_only=outputs_only, noise_free=noise_free,
                         what=step.label, allow_nonfinite=True, renames=step_renames)
        renames = _compose_renames(renames, step_renames)
        noisy = noisy or (checking and noise_free is not None)
        rep = StepReport(
            index=step.index,
            kind=step.kind,
            target=step.target,
            args=dict(step.args),
            seed=s,
            changes=diff_models(current, student).to_dict(),
            report=surgery_report.to_dict() if hasattr(surgery_report, "to_dict") else surgery_report,
            verification=checked.verification,
            noise_deviation=checked.noise_deviation,
        )
        reports.append(rep)
        if on_step is not None:
            on_step(rep)
        current = student

    if checking and len(recipe.steps) > 1:
        reports[-1].end_to_end, reports[-1].end_to_end_judged = _check_end_to_end(
            model, current, base_seed, settings, dev, noisy, outputs_only, renames)
    # Verified above, step by step and end to end: the chain's last link is the write.
    commit(model, current, out, verify=False, dry_run=dry_run, allow_nonfinite=allow_nonfinite, **write)
    return current, reports


def _tolerance_given(settings: VerifySettings) -> bool:
    return settings.atol is not None or settings.rtol is not None


def _compose_renames(renames: dict, step: Optional[dict]) -> dict:
    """Original name -> current name after one more step's renames (old -> new of that step)."""
    if not step:
        return renames
    out = {orig: step.get(now, now) for orig, now in renames.items()}
    current = set(renames.values())
    for old, new in step.items():
        if old not in renames and old not in current:  # still under its original name until now
            out[old] = new
    return out


def _check_end_to_end(teacher, student, seed: int, settings: VerifySettings, device: str, noisy: bool,
                      outputs_only: bool = False, renames: Optional[dict] = None):
    """The final student against the original teacher, so errors cannot add up step by step.

    After a noisy step, with no tolerance in the recipe, the figure is measured and reported
    but not judged (the noise was accepted step by step already); after a noisy step only the
    outputs are compared, since the noise moves the values inside by design. Returns (result, judged).
    """
    from .verify import verify as run_verify

    result = run_verify(teacher, student, probes=settings.probes, seed=seed, device=device, atol=settings.atol,
                        rtol=settings.rtol, intermediates=not (noisy or outputs_only), renames=renames or None)
    judged = not noisy or _tolerance_given(settings)
    if judged and not result.passed:
        reason = result.describe_failure("the original teacher", "the final student")
        raise VerificationFailed(
            f"every step passed, but the final student differs from the original teacher: {reason}; nothing was written",
            result,
        )
    return result, judged


def _run_step(model, step: Step, seed: int):
    if step.kind == "widen" and any(k in step.args for k in _HEAD_KEYS):
        from .widen import is_glob, widen_attention

        if not isinstance(step.args["layer"], str) or is_glob(step.args["layer"]):
            raise N2NError("heads, kv_heads and head_dim grow one attention node per step: give one layer name, "
                           "and one step per attention node")
        return widen_attention(model, step.args["layer"], seed=seed, **{k: v for k, v in step.args.items() if k != "layer"})
    if step.kind == "widen":
        from .widen import is_glob, widen, widen_many

        layer = step.args["layer"]
        several = not isinstance(layer, str) or is_glob(layer)
        return (widen_many if several else widen)(model, layer, step.args["width"], seed=seed,
                                                  **{k: v for k, v in step.args.items() if k not in ("layer", "width")})
    from .deepen import deepen

    return deepen(model, step.args["after"], seed=seed, **{k: v for k, v in step.args.items() if k != "after"})
