"""n2n widen: Net2WiderNet on one layer and everything coupled to it."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, List

import typer
from rich.table import Table

from . import app
from .common import escape  # rich's escape, and control characters in names made visible
from .common import (
AllowNonfiniteOpt, ArchOpt, AtolOpt, CheckpointArg, DeviceChoice, DeviceOpt, JsonOpt, MaxShardSizeOpt, OutputOpt,
    OverwriteInputOpt, ProbesOpt, RtolOpt, SeedOpt, VerifyOpt, check_json_target, command, console, finish_surgery,
    DryRunOpt, OutputsOnlyOpt, preflight_surgery, require_output,
)
from .common import FormatOpt


class Split(str, Enum):
    equal = "equal"
    random = "random"


def print_widen_report(report: dict, heading: bool = True) -> None:
    if heading:
        console.print(
            f"widened [bold]{escape(report['layer'])}[/] {report['old_width']} → {report['new_width']} units "
            f"(split {report['split']}, seed {report['seed']}); coupled group: {escape(', '.join(report['group']))}"
        )
    table = Table(title="tensors changed" if heading else f"tensors changed ({escape(report['layer'])})", title_justify="left")
    table.add_column("tensor")
    table.add_column("old shape")
    table.add_column("new shape")
    for c in report["changes"]:
        table.add_row(escape(c["key"]), str(c["old_shape"]), str(c["new_shape"]))
    for node, attrs in report["attr_changes"].items():
        for k, v in attrs.items():
            table.add_row(escape(f"{node} (attribute {k})"), "", str(v))
    console.print(table)
    if report.get("noise_deviation") is not None:
        d = report["noise_deviation"]
        console.print(
            f"noise σ={report['noise']:g} moves the outputs by max |Δ| {d['max_abs']:.3g} (relative {d['max_rel']:.3g}); "
            "the verification below is of the same widening without noise"
        )


def print_widen_many(report: dict) -> None:
    """Several groups (--layer repeated or a glob): one line per group, one table of every tensor."""
    groups = report["groups"]
    console.print(f"widened {len(groups)} coupled group(s) to {report['width']} units (seed {report['seed']}):")
    for g in groups:
        console.print(
            f"  [bold]{escape(g['layer'])}[/] {g['old_width']} → {g['new_width']} (split {g['split']}); "
            f"group: {escape(', '.join(g['group']))}"
        )
    for s in report["skipped"]:
        console.print(f"  {escape(s['layer'])}: widened with {escape(s['widened_with'])} (same coupled group)")
    for g in groups:
        print_widen_report(dict(g, noise_deviation=None), heading=False)
    if report.get("noise_deviation") is not None:
        d = report["noise_deviation"]
        console.print(
            f"noise σ={groups[0]['noise']:g} moves the outputs by max |Δ| {d['max_abs']:.3g} (relative {d['max_rel']:.3g}); "
            "the verification below is of the same widening without noise"
        )


@app.command("widen")
@command
def widen_cmd(
    checkpoint: CheckpointArg,
    layer: Annotated[List[str], typer.Option("--layer", help="The linear or conv node to widen. Repeat it, or give a glob (model.layers.*.mlp.up_proj), to widen several layers, each its own coupled group, all to --width, verified together.", show_default=False, rich_help_panel="Widening")],
    width: Annotated[int, typer.Option("--width", help="Its new number of output units (larger than now).", show_default=False, rich_help_panel="Widening")],
    output: OutputOpt = None,
    arch: ArchOpt = None,
    split: Annotated[Split, typer.Option("--split", help="equal: replicas share outgoing weights equally (the paper); random: random proportions summing to one (exact, breaks symmetry).", rich_help_panel="Widening")] = Split.equal,
    noise: Annotated[float, typer.Option("--noise", min=0.0, help="The paper's noise (σ relative to each tensor's std) on new replicas only; not exact: the deviation is reported.", rich_help_panel="Widening")] = 0.0,
    seed: SeedOpt = 0,
    device: DeviceOpt = DeviceChoice.auto,
    verify: VerifyOpt = True,
    probes: ProbesOpt = 64,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    json_out: JsonOpt = False,
    max_shard_size: MaxShardSizeOpt = None,
    overwrite_input: OverwriteInputOpt = False,
    allow_nonfinite: AllowNonfiniteOpt = False,
    dry_run: DryRunOpt = False,
    outputs_only: OutputsOnlyOpt = False,
    output_format: FormatOpt = None,
):
    """Net2WiderNet: give LAYER WIDTH output units; every coupled tensor is remapped with one shared map."""
    from ..model import load_model  # torch: only once a command runs
    from ..widen import is_glob, widen, widen_many

    check_json_target(json_out, output)
    require_output(output, dry_run)
    teacher = load_model(checkpoint, arch)
    preflight_surgery(teacher, output, overwrite_input=overwrite_input, allow_nonfinite=allow_nonfinite, max_shard_size=max_shard_size,
                      output_format=getattr(output_format, "value", None))
    several = len(layer) > 1 or is_glob(layer[0])
    if several:
        student, report = widen_many(teacher, layer, width, split=split.value, noise=noise, seed=seed)
    else:
        student, report = widen(teacher, layer[0], width, split=split.value, noise=noise, seed=seed)
    what = f"widening {', '.join(map(repr, layer))}"
    finish_surgery(teacher, student, report.to_dict(), output=output, verify=verify, probes=probes, seed=seed,
                   device=device.value, atol=atol, rtol=rtol, json_out=json_out, what=what,
                   print_report=print_widen_many if several else print_widen_report, noise_free=report.noise_free,
                   max_shard_size=max_shard_size,
                   overwrite_input=overwrite_input, allow_nonfinite=allow_nonfinite, dry_run=dry_run,
                   outputs_only=outputs_only, output_format=output_format)
