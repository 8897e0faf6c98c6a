"""n2n grow: take a Hugging Face model folder to bigger sizes, planned, verified step by step."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, List, Optional

import typer
from rich.table import Table

from . import app
from ..errors import N2NError
from .common import escape  # rich's escape, and control characters in names made visible
from .widen_cmd import Split
from .common import (
    AllowNonfiniteOpt, AtolOpt, DeviceChoice, DeviceOpt, FormatOpt, JsonOpt, MaxShardSizeOpt, OutputOpt,
    OutputsOnlyOpt, OverwriteInputOpt, ProbesOpt, RtolOpt, SeedOpt, SeqLenOpt, VerifyOpt, check_json_target, command,
    console, emit_json, preflight_surgery, print_verify, print_written, require_output,
)


class BlockChoice(str, Enum):
    copy = "copy"
    zero = "zero"


_TARGET = "Target"


@app.command("grow")
@command
def grow_cmd(
    checkpoint: Annotated[str, typer.Argument(help="Hugging Face model folder (config.json and its tensors).", show_default=False, metavar="MODEL")],
    sets: Annotated[Optional[List[str]], typer.Option("--set", help="FIELD=VALUE, a config size to grow to (hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim, num_hidden_layers; GPT-2: n_embd, n_inner, n_head, n_layer). Repeatable.", rich_help_panel=_TARGET, show_default=False, metavar="FIELD=VALUE")] = None,
    to: Annotated[Optional[str], typer.Option("--to", help="A target config.json: grow every size it names.", rich_help_panel=_TARGET, show_default=False, metavar="CONFIG")] = None,
    block: Annotated[BlockChoice, typer.Option("--block", help="New blocks: copy (of the block before, writers zero: LLaMA-Pro) or zero.", rich_help_panel=_TARGET)] = BlockChoice.copy,
    split: Annotated[Optional[Split], typer.Option("--split", help="How copied MLP units and heads share their outgoing weights, as for widen: equal (the default) or random (random proportions summing to one: exact, and the copies stop getting identical gradients); zero and tile where widen allows them. The residual stream and head_dim are zero-padded whatever this says.", show_default=False, rich_help_panel=_TARGET)] = None,
    output: OutputOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = DeviceChoice.auto,
    verify: VerifyOpt = True,
    probes: ProbesOpt = 64,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    seq_len: SeqLenOpt = None,
    json_out: JsonOpt = False,
    max_shard_size: MaxShardSizeOpt = None,
    overwrite_input: OverwriteInputOpt = False,
    allow_nonfinite: AllowNonfiniteOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan, run nothing, write nothing.", rich_help_panel="Output")] = False,
    outputs_only: OutputsOnlyOpt = False,
    output_format: FormatOpt = None,
):
    """Grow a Hugging Face model to the sizes --set or --to name: plan the widen and deepen steps, run and verify each and the whole, write the folder."""
    from ..commit import commit  # torch: only once a command runs
    from ..grow import parse_sets, plan_growth, run_plan, target_from_config, verification_dict
    from ..hf_folder import is_hf_folder, read_config
    from ..model import load_model

    check_json_target(json_out, output)
    require_output(output, dry_run)
    if not is_hf_folder(checkpoint):
        raise N2NError(f"{checkpoint}: n2n grow needs a Hugging Face model folder (config.json beside model.safetensors or an index)")
    if not sets and to is None:
        raise N2NError("say what to grow to: --set FIELD=VALUE (e.g. --set intermediate_size=128) or --to target-config.json")
    teacher = load_model(checkpoint, seq_len=seq_len)
    target = {}
    if to is not None:
        target.update(target_from_config(_read_json(to), teacher.hf.config, to))
    target.update(parse_sets(sets or []))
    plan = plan_growth(teacher, target, block.value, None if split is None else split.value)
    for step in plan.steps:  # refused before the plan is shown: one line, exit 2
        if not step.available:
            raise N2NError(step.why)
    fmt = getattr(output_format, "value", None)
    preflight_surgery(teacher, output, overwrite_input=overwrite_input, allow_nonfinite=allow_nonfinite,
                      max_shard_size=max_shard_size, output_format=fmt)  # on a dry run too: -o is checked if given
    if dry_run:
        _report_plan(plan, json_out)
        return
    if not json_out:
        _print_plan(plan)
    check = dict(probes=probes, device=device.value, atol=atol, rtol=rtol, outputs_only=outputs_only)
    student, results, renames = run_plan(teacher, plan, seed=seed, verify=verify, on_step=None if json_out else _print_step, **check)
    done = commit(teacher, student, output, verify=verify, seed=seed, what="the whole growth", renames=renames,
                  max_shard_size=max_shard_size, overwrite_input=overwrite_input, allow_nonfinite=allow_nonfinite,
                  output_format=fmt, **check)
    end = done.verification
    if json_out:
        emit_json({"plan": plan.to_dict(), "steps": results, "end_to_end": verification_dict(end),
                   "parameters": {"before": teacher.parameter_count(), "after": student.parameter_count()},
                   "output": output, "dry_run": False})
        return
    if end is not None:
        print_verify(end)
    console.print(f"parameters {teacher.parameter_count():,} → {student.parameter_count():,}")
    print_written(output, False)


def _read_json(path: str) -> dict:
    from ..inputs import open_input, read_limited
    from ..jsonio import JSONRefused, parse_json

    with open_input(path, "a target config") as f:
        raw = read_limited(f, 16 * 1024 * 1024, path, "a target config")
    try:
        return parse_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, JSONRefused) as e:
        raise N2NError(f"{path}: not valid JSON ({e})") from None


def _report_plan(plan, json_out: bool) -> None:
    if json_out:
        emit_json({"plan": plan.to_dict(), "dry_run": True, "output": None})
        return
    _print_plan(plan)
    console.print("dry run: nothing run, nothing written")


def _print_plan(plan) -> None:
    table = Table(title=f"grow plan ({escape(plan.family)})", title_justify="left")
    for col in ("#", "field", "from", "to", "step"):
        table.add_column(col, justify="right" if col in ("#", "from", "to") else "left")
    for i, s in enumerate(plan.steps, 1):
        kind, args = next(iter(s.step.items()))
        text = f"{kind} " + " ".join(f"{k}={v if not isinstance(v, list) else ','.join(v)}" for k, v in args.items())
        table.add_row(str(i), escape(s.field), str(s.old), str(s.new), escape(text) + ("" if s.available else " [red](not available)[/]"))
    if not plan.steps:
        table.add_row("", "(nothing to grow)", "", "", "")
    console.print(table)


def _print_step(i, step, verification) -> None:
    err = f"max |Δ| {verification.max_abs:.3g}, {'pass' if verification.passed else 'FAIL'}" if verification is not None else "not verified"
    console.print(f"step {i} {escape(step.field)} {step.old} → {step.new}: {err}")
