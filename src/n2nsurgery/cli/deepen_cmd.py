"""n2n deepen: insert an identity layer or a zero-initialised residual branch after a node."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer
from rich.table import Table

from . import app
from ..errors import N2NError
from .common import check_new_name, escape  # escape: rich's, and control characters in names made visible
from .common import (
    AllowNonfiniteOpt,
    ArchOpt,
    AtolOpt,
    CheckpointArg,
    DeviceChoice,
    DeviceOpt,
    JsonOpt,
    MaxShardSizeOpt,
    OutputOpt,
    OverwriteInputOpt,
    ProbesOpt,
    RtolOpt,
    SeedOpt,
    VerifyOpt,
    DryRunOpt,
    OutputsOnlyOpt,
    check_json_target,
    preflight_surgery,
    require_output,
    command,
    console,
    finish_surgery,
)
from .common import FormatOpt, SeqLenOpt


class OpChoice(str, Enum):
    auto = "auto"
    linear = "linear"
    conv = "conv"
    residual = "residual"


class BlockChoice(str, Enum):
    copy = "copy"
    zero = "zero"


_LAYER = "New layer"
_BLOCK = "New block (transformers)"


@app.command("deepen")
@command
def deepen_cmd(
    checkpoint: CheckpointArg,
    after: Annotated[Optional[str], typer.Option("--after", help="Node (or float model input) the new layer follows; its consumers read the new layer instead. Required unless --every.", rich_help_panel=_LAYER, show_default=False)] = None,
    output: OutputOpt = None,
    arch: ArchOpt = None,
    op: Annotated[OpChoice, typer.Option("--op", help="auto: linear for 1-D features and [T, d] token sequences (features last), conv for [C, *spatial]; linear/conv: identity layer; residual: x + W2·φ(W1·x) with W2 = 0 (exact after any value).", rich_help_panel=_LAYER)] = OpChoice.auto,
    activation: Annotated[Optional[str], typer.Option("--activation", help="φ after the new layer: relu, relu6, leaky_relu, sigmoid, tanh, silu, gelu or none. Default: the activation of --after when it is one (else none); relu inside a residual branch.", rich_help_panel=_LAYER, show_default=False)] = None,
    kernel_size: Annotated[int, typer.Option("--kernel-size", help="Odd kernel size of a new convolution (padding k//2, stride 1).", rich_help_panel=_LAYER)] = 3,
    batchnorm: Annotated[bool, typer.Option("--batchnorm", help="Add a batchnorm after the new layer, the identity at inference (training mode normalises by batch statistics).", rich_help_panel=_LAYER)] = False,
    hidden: Annotated[Optional[int], typer.Option("--hidden", help="Width of a residual branch (default: the width of --after).", rich_help_panel=_LAYER, show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Name of the new node (default: <after>_deep, or _deep2, ... when taken).", rich_help_panel=_LAYER, show_default=False)] = None,
    block: Annotated[Optional[BlockChoice], typer.Option("--block", help="Insert a whole pre-norm residual block after block --after (model.layers.3, transformer.h.3) with zero writers: copy (of that block, LLaMA-Pro) or zero (identity norms, fresh readers). Later blocks are renumbered.", rich_help_panel=_BLOCK, show_default=False)] = None,
    every: Annotated[Optional[int], typer.Option("--every", min=1, help="With --block: a new block after every K-th block (LLaMA-Pro's expansion), instead of --after.", rich_help_panel=_BLOCK, show_default=False, metavar="K")] = None,
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
    seq_len: SeqLenOpt = None,
):
    """Net2DeeperNet: insert a new layer after --after, initialised so the function is unchanged.

    An identity layer followed by an activation φ is inserted only where φ(v) = v for every value --after can produce (relu after a relu, for instance); anything else is refused with the alternative that would work.
    """
    from ..deepen import deepen  # torch: only once a command runs
    from ..model import load_model

    check_json_target(json_out, output)
    require_output(output, dry_run)
    check_new_name("--name", name)
    _check_where(after, every, block)
    teacher = load_model(checkpoint, arch, seq_len=seq_len)
    preflight_surgery(teacher, output, overwrite_input=overwrite_input, allow_nonfinite=allow_nonfinite, max_shard_size=max_shard_size,
                      output_format=getattr(output_format, "value", None))
    if every is not None:
        from ..blocks import deepen_blocks, every_kth_block

        student, report = deepen_blocks(teacher, every_kth_block(teacher, every), block.value, seed=seed)
        after = f"every {every}th block"
    else:
        student, report = deepen(
            teacher,
            after,
            op=op.value,
            activation=activation,
            kernel_size=kernel_size,
            batchnorm=batchnorm,
            hidden=hidden,
            name=name,
            seed=seed,
            block=block.value if block is not None else None,
        )
    finish_surgery(
        teacher,
        student,
        report.to_dict(),
        output=output,
        verify=verify,
        probes=probes,
        seed=seed,
        device=device.value,
        atol=atol,
        rtol=rtol,
        json_out=json_out,
        what=f"deepening after {after!r}",
        print_report=_print_blocks_report if every is not None else _print_block_report if block is not None else _print_report,
        renames=getattr(report, "renames", None),
        max_shard_size=max_shard_size,
        overwrite_input=overwrite_input,
        allow_nonfinite=allow_nonfinite,
        dry_run=dry_run,
        outputs_only=outputs_only,
        output_format=output_format,
    )


def _check_where(after, every, block) -> None:
    """Exactly one of --after and --every; --every inserts blocks, so it needs --block."""
    if (after is None) == (every is None):
        raise N2NError("give --after NODE (one new layer or block) or --every K (a new block after every K-th), not "
                       + ("both" if after is not None else "neither"))
    if every is not None and block is None:
        raise N2NError("--every K inserts whole blocks: add --block copy (LLaMA-Pro) or --block zero")


def _print_blocks_report(report: dict) -> None:
    console.print(f"{report['new_blocks']} new blocks (--block {report['block']}) after {escape(', '.join(report['after']))}")
    for step in report["steps"]:
        console.print(f"  {escape(step['new_block'])}: after {escape(step['after'])} (then), zeroed writers {escape(', '.join(step['writers']))}")
    a = report["arch"]
    console.print(
        f"nodes {a['nodes_before']} → {a['nodes_after']}, parameters {a['parameters_before']:,} → {a['parameters_after']:,}"
    )


def _shape(s) -> str:
    return "[" + ", ".join(map(str, s)) + "]"


def _print_report(report: dict) -> None:
    what = report["op"] + (f", kernel {report['kernel_size']}" if report["kernel_size"] else "")
    act = report["activation"] or "no activation"
    console.print(
        f"deepen after [bold]{escape(report['after'])}[/] (values in {report['value_range']}): "
        f"{escape(what)}, {'batchnorm, ' if report['batchnorm'] else ''}{escape(act)}"
        + (f", hidden {report['hidden']}" if report["hidden"] else "")
    )
    table = Table(title="new nodes", title_justify="left")
    for col in ("node", "op", "inputs"):
        table.add_column(col)
    for n in report["nodes"]:
        table.add_row(escape(n["name"]), n["op"], escape(", ".join(n["in"])))
    console.print(table)
    table = Table(title="new tensors", title_justify="left")
    for col in ("tensor", "shape", "dtype"):
        table.add_column(col)
    for t in report["tensors"]:
        table.add_row(escape(t["key"]), _shape(t["shape"]), t["dtype"])
    console.print(table)
    moved = report["rewired"] + [f"output {o['from']}" for o in report["outputs"]]
    last = report["nodes"][-1]["name"]
    if moved:
        console.print(f"now reading {escape(last)}: {escape(', '.join(moved))}")
    a = report["arch"]
    console.print(
        f"nodes {a['nodes_before']} → {a['nodes_after']}, parameters {a['parameters_before']:,} → {a['parameters_after']:,}"
    )


def _print_block_report(report: dict) -> None:
    console.print(
        f"new block [bold]{escape(report['new_block'])}[/] after {escape(report['after'])} "
        f"(--block {report['block']}); zeroed writers: {escape(', '.join(report['writers']))}"
    )
    table = Table(title="new tensors", title_justify="left")
    for col in ("tensor", "shape", "dtype", "init"):
        table.add_column(col)
    for t in report["tensors"]:
        table.add_row(escape(t["key"]), _shape(t["shape"]), t["dtype"], t["init"])
    console.print(table)
    if report["renames"]:
        shown = ", ".join(f"{escape(b['from'])} → {escape(b['to'])}" for b in report["renumbered_blocks"])
        console.print(f"renumbered {len(report['renames'])} nodes and {report['renamed_keys']} tensors: {shown}")
    a = report["arch"]
    console.print(
        f"nodes {a['nodes_before']} → {a['nodes_after']}, parameters {a['parameters_before']:,} → {a['parameters_after']:,}"
    )
