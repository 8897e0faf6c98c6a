"""n2n widen: Net2WiderNet on one layer and everything coupled to it."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, List, Optional

import typer
from rich.table import Table

from ..errors import N2NError
from . import app
from .common import escape  # rich's escape, and control characters in names made visible
from .common import (
AllowNonfiniteOpt, ArchOpt, AtolOpt, CheckpointArg, DeviceChoice, DeviceOpt, JsonOpt, MaxShardSizeOpt, OutputOpt,
    OverwriteInputOpt, ProbesOpt, RtolOpt, SeedOpt, VerifyOpt, check_json_target, command, console, finish_surgery,
    DryRunOpt, OutputsOnlyOpt, preflight_surgery, require_output,
)
from .common import FormatOpt


def _heads_split(split, head_dim):
    """--split for heads: None (not given) is each growth's own default (equal for heads, zero for
    head_dim, whose new dims are padded with zeros)."""
    return None if split is None else split.value


class Split(str, Enum):
    equal = "equal"
    random = "random"
    zero = "zero"
    average = "average"
    tile = "tile"


def print_widen_report(report: dict, heading: bool = True) -> None:
    # A copy map is named by its shares (equal, random); any other mode by itself (zero, ...)
    mode = f"split {report['split']}" if report.get("fill", "copy") == "copy" else f"fill {report['fill']}"
    if report.get("heads") is not None:
        _print_heads_line(report)
    elif heading:
        console.print(
            f"widened [bold]{escape(report['layer'])}[/] {report['old_width']} → {report['new_width']} units "
            f"({mode}, seed {report['seed']}); coupled group: {escape(', '.join(report['group']))}"
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
    _print_noise(report.get("noise_deviation"), report.get("noise"))


def _print_noise(deviation, noise) -> None:
    if deviation is not None:
        console.print(
            f"noise σ={noise:g} moves the outputs by max |Δ| {deviation['max_abs']:.3g} (relative {deviation['max_rel']:.3g}); "
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
    _print_noise(report.get("noise_deviation"), groups[0]["noise"] if groups else 0.0)


def _print_heads_line(report: dict) -> None:
    old, new = report["heads"]["old"], report["heads"]["new"]
    sizes = ", ".join(f"{k} {old[k]:g} → {new[k]:g}" for k in new if old.get(k) != new[k])
    console.print(
        f"grew [bold]{escape(report['layer'])}[/]: {sizes} (split {report['split']}, seed {report['seed']}); "
        f"projections: {escape(', '.join(report['group']))}"
    )


def _heads_request(width, heads, kv_heads, head_dim, noise) -> bool:
    """Whether this run grows attention heads (True) or widens a layer (False); usage errors
    for a mix of the two families, or neither."""
    head_flags = [f for f, v in (("--heads", heads), ("--kv-heads", kv_heads), ("--head-dim", head_dim)) if v is not None]
    if width is not None and head_flags:
        raise N2NError(
            f"give either --width (a linear or conv layer's units) or {', '.join(head_flags)} (an attention node's heads), not both"
        )
    if width is None and not head_flags:
        raise N2NError("give --width N to widen a linear or conv layer, or --heads N, --kv-heads N or --head-dim N to grow an attention node")
    if head_flags and noise:
        raise N2NError("--noise applies to --width only; growing heads is exact (use --split random to break the symmetry of copied heads)")
    return bool(head_flags)


@app.command("widen")
@command
def widen_cmd(
    checkpoint: CheckpointArg,
    layer: Annotated[List[str], typer.Option("--layer", help="The linear or conv node to widen (or the attention node whose heads grow). Repeat it, or give a glob (model.layers.*.mlp.up_proj), to widen several layers, each its own coupled group, all to --width, verified together.", show_default=False, rich_help_panel="Widening")],
    width: Annotated[Optional[int], typer.Option("--width", help="Its new number of output units (larger than now).", show_default=False, rich_help_panel="Widening")] = None,
    output: OutputOpt = None,
    arch: ArchOpt = None,
    split: Annotated[Optional[Split], typer.Option("--split", help="equal: replicas share outgoing weights equally (the paper); random: random proportions summing to one (exact, breaks symmetry); zero: new units 0 (RMSNorm streams); average: new units carry the mean (LayerNorm streams); tile: every unit copied WIDTH/n times. Default: the first exact one of equal, zero, average, tile.", show_default=False, rich_help_panel="Widening")] = None,
    noise: Annotated[float, typer.Option("--noise", min=0.0, help="The paper's noise (σ relative to each tensor's std) on new replicas only; not exact: the deviation is reported.", rich_help_panel="Widening")] = 0.0,
    heads: Annotated[Optional[int], typer.Option("--heads", help="Attention: query heads N (MHA: every head, kv heads too; GQA: a multiple of the kv heads).", show_default=False, rich_help_panel="Attention heads")] = None,
    kv_heads: Annotated[Optional[int], typer.Option("--kv-heads", help="Attention: kv heads N, each new one with a copy of its query group.", show_default=False, rich_help_panel="Attention heads")] = None,
    head_dim: Annotated[Optional[int], typer.Option("--head-dim", help="Attention: dims per head N (even with rotary; rope theta changes).", show_default=False, rich_help_panel="Attention heads")] = None,
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
    from ..widen import is_glob, widen, widen_attention, widen_many

    grow_heads = _heads_request(width, heads, kv_heads, head_dim, noise)
    check_json_target(json_out, output)
    require_output(output, dry_run)
    teacher = load_model(checkpoint, arch)
    preflight_surgery(teacher, output, overwrite_input=overwrite_input, allow_nonfinite=allow_nonfinite, max_shard_size=max_shard_size,
                      output_format=getattr(output_format, "value", None))
    several = len(layer) > 1 or is_glob(layer[0])
    split_word = split.value if split is not None else None  # None: the first exact mode for the group
    if grow_heads:
        if several:
            raise N2NError("--heads, --kv-heads and --head-dim grow one attention node per step: give one --layer, "
                           "and repeat the command (or a recipe step) for each attention node")
        student, report = widen_attention(teacher, layer[0], heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                          split=_heads_split(split, head_dim), seed=seed)
    elif several:
        student, report = widen_many(teacher, layer, width, split=split_word, noise=noise, seed=seed)
    else:
        student, report = widen(teacher, layer[0], width, split=split_word, noise=noise, seed=seed)
    what = f"widening {', '.join(map(repr, layer))}"
    finish_surgery(teacher, student, report.to_dict(), output=output, verify=verify, probes=probes, seed=seed,
                   device=device.value, atol=atol, rtol=rtol, json_out=json_out, what=what,
                   print_report=print_widen_many if several else print_widen_report, noise_free=report.noise_free,
                   max_shard_size=max_shard_size,
                   overwrite_input=overwrite_input, allow_nonfinite=allow_nonfinite, dry_run=dry_run,
                   outputs_only=outputs_only, output_format=output_format)
