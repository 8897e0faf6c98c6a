"""n2n apply: run a recipe's steps in order, each verified, and write the final student."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import N2NError
from ..recipe import SEED_LIMIT, apply_recipe, load_recipe, result_dict
from . import app
from .common import escape  # rich's escape, and control characters in names made visible
from .common import (
    AllowNonfiniteOpt, ArchOpt, CheckpointArg, DeviceChoice, JsonOpt, MaxShardSizeOpt, OutputOpt, OverwriteInputOpt,
    check_json_target, command, console, emit_json, DryRunOpt, OutputsOnlyOpt, print_written, require_output,
)


@app.command("apply")
@command
def apply_cmd(
    checkpoint: CheckpointArg,
    recipe: Annotated[str, typer.Argument(help="Recipe YAML: seed, steps, verify; '-' reads standard input (then CKPT must be a file).", show_default=False)],
    output: OutputOpt = None,
    arch: ArchOpt = None,
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, max=SEED_LIMIT - 1, help="Override the recipe's seed (steps that name their own seed keep it).", rich_help_panel="Randomness", show_default=False)] = None,
    device: Annotated[Optional[DeviceChoice], typer.Option("--device", help="Where to verify; overrides the recipe's verify.device (default auto: the GPU when present).", rich_help_panel="Verification", show_default=False)] = None,
    verify: Annotated[Optional[bool], typer.Option("--verify/--no-verify", help="Check every step (overrides the recipe's verify: true/false).", rich_help_panel="Verification", show_default=False)] = None,
    json_out: JsonOpt = False,
    max_shard_size: MaxShardSizeOpt = None,
    overwrite_input: OverwriteInputOpt = False,
    allow_nonfinite: AllowNonfiniteOpt = False,
    dry_run: DryRunOpt = False,
    outputs_only: OutputsOnlyOpt = False,
):
    """Run a recipe: each step verified against the one before; the first failure stops the run and writes nothing."""
    from ..model import load_model  # torch: only once a command runs

    check_json_target(json_out, output)
    require_output(output, dry_run)
    if checkpoint == "-" and recipe == "-":
        raise N2NError("only one of CKPT and RECIPE can be '-' (standard input)")
    if output == "-" and not dry_run and sys.stdout.isatty():  # say so before the work, not after it
        raise N2NError("refusing to write a binary checkpoint to a terminal: redirect it (-o - > file, or | n2n ...) or give -o FILE")
    rec = load_recipe(recipe)  # validate the recipe before reading a possibly large checkpoint
    teacher = load_model(checkpoint, arch)

    def progress(rep):
        if json_out:
            return
        err = f"max |Δ| {_error_text(rep)}" if rep.verification is not None else "not verified"
        console.print(f"step {rep.index}/{len(rec.steps)} {rep.kind} {escape(rep.target)}: {escape(rep.summary)} ({err})")

    # The whole chain (output check, finiteness, steps, verification, write) is apply_recipe's.
    student, reports = apply_recipe(
        teacher, rec, seed=seed, verify=verify, device=device.value if device is not None else None, on_step=progress,
        out=output, dry_run=dry_run, outputs_only=outputs_only, max_shard_size=max_shard_size,
        overwrite_input=overwrite_input, allow_nonfinite=allow_nonfinite,
    )
    end_to_end, judged = reports[-1].end_to_end, reports[-1].end_to_end_judged
    if json_out:
        emit_json({
            "recipe": rec.source,
            "seed": rec.seed if seed is None else seed,
            "output": output,
            "dry_run": dry_run,
            "steps": [r.to_dict() for r in reports],
            "end_to_end": result_dict(end_to_end, judged),
            "parameters": {"before": teacher.parameter_count(), "after": student.parameter_count()},
        })
        return
    _print_summary(reports, end_to_end, judged, teacher, student)
    print_written(output, dry_run)


def _print_summary(reports, end_to_end, judged, teacher, student) -> None:
    table = Table(title="recipe applied", title_justify="left")
    for col in ("step", "surgery", "seed", "what changed", "max |Δ|", "result"):
        table.add_column(col, justify="right" if col in ("step", "seed", "max |Δ|") else "left", overflow="fold")
    for r in reports:
        v = r.verification
        table.add_row(
            str(r.index),
            escape(f"{r.kind} {r.target}"),
            str(r.seed),
            escape(r.summary),
            _error_text(r) if v is not None else "",
            ("[green]pass[/]" if v.passed else "[bold red]FAIL[/]") if v is not None else "[yellow]not verified[/]",
        )
    if end_to_end is not None:
        table.add_row(
            "all", "final vs original teacher", str(end_to_end.seed), "",  # (the recipe's seed)
            f"{end_to_end.max_abs:.3g}",
            "[yellow]measured[/] (noise)" if not judged else "[green]pass[/]" if end_to_end.passed else "[bold red]FAIL[/]",
        )
    console.print(table)
    checked = [r.verification for r in reports if r.verification is not None]
    if checked:
        v = checked[-1]
        console.print(f"verified within atol={v.atol:g}, rtol={v.rtol:g} on {v.probes} probes per step (device {escape(v.device)})")
    else:
        console.print("[yellow]not verified[/] (verify: false or --no-verify)")
    console.print(f"parameters {teacher.parameter_count():,} → {student.parameter_count():,}")


def _error_text(rep) -> str:
    text = f"{rep.verification.max_abs:.3g}"
    if rep.noise_deviation is not None:
        text += f" (noise: {rep.noise_deviation['max_abs']:.3g})"
    return text
