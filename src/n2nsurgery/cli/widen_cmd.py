"""n2n widen: Net2WiderNet on one layer and everything coupled to it."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer
from rich.table import Table

from . import app
from .common import escape  # rich's escape, and control characters in names made visible
from .common import (
AllowNonfiniteOpt, ArchOpt, AtolOpt, CheckpointArg, DeviceChoice, DeviceOpt, JsonOpt, MaxShardSizeOpt, OutputOpt,
    OverwriteInputOpt, ProbesOpt, RtolOpt, SeedOpt, VerifyOpt, check_json_target, command, console, finish_surgery,
    DryRunOpt, OutputsOnlyOpt, preflight_surgery, require_output,
)


class Split(str, Enum):
    equal = "equal"
    random = "random"
    zero = "zero"
    average = "average"
    tile = "tile"


def print_widen_report(report: dict) -> None:
    # A copy map is named by its shares (equal, random); any other mode by itself (zero, ...)
    mode = f"split {report['split']}" if report.get("fill", "copy") == "copy" else f"fill {report['fill']}"
    console.print(
        f"widened [bold]{escape(report['layer'])}[/] {report['old_width']} → {report['new_width']} units "
        f"({mode}, seed {report['seed']}); coupled group: {escape(', '.join(report['group']))}"
    )
    table = Table(title="tensors changed", title_justify="left")
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


@app.command("widen")
@command
def widen_cmd(
    checkpoint: CheckpointArg,
    layer: Annotated[str, typer.Option("--layer", help="The linear or conv node to widen.", show_default=False, rich_help_panel="Widening")],
    width: Annotated[int, typer.Option("--width", help="Its new number of output units (larger than now).", show_default=False, rich_help_panel="Widening")],
    output: OutputOpt = None,
    arch: ArchOpt = None,
    split: Annotated[Optional[Split], typer.Option("--split", help="equal: replicas share outgoing weights equally (the paper); random: random proportions summing to one (exact, breaks symmetry); zero: new units 0 (RMSNorm streams); average: new units carry the mean (LayerNorm streams); tile: every unit copied WIDTH/n times. Default: the first exact one of equal, zero, average, tile.", show_default=False, rich_help_panel="Widening")] = None,
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
):
    """Net2WiderNet: give LAYER WIDTH output units; every coupled tensor is remapped with one shared map."""
    from ..model import load_model  # torch: only once a command runs
    from ..widen import widen

    check_json_target(json_out, output)
    require_output(output, dry_run)
    teacher = load_model(checkpoint, arch)
    preflight_surgery(teacher, output, overwrite_input=overwrite_input, allow_nonfinite=allow_nonfinite, max_shard_size=max_shard_size)
    student, report = widen(teacher, layer, width, split=split.value if split is not None else None, noise=noise, seed=seed)
    finish_surgery(teacher, student, report.to_dict(), output=output, verify=verify, probes=probes, seed=seed,
                   device=device.value, atol=atol, rtol=rtol, json_out=json_out, what=f"widening {layer!r}",
                   print_report=print_widen_report, noise_free=report.noise_free, max_shard_size=max_shard_size,
                   overwrite_input=overwrite_input, allow_nonfinite=allow_nonfinite, dry_run=dry_run,
                   outputs_only=outputs_only)
