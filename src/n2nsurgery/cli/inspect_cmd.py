"""n2n inspect: a table of nodes, shapes and parameters."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from .. import inspect as inspect_mod
from ..model import load_model
from . import app
from .common import ArchOpt, CheckpointArg, JsonOpt, command, console, emit_json


def _shape(s) -> str:
    return "[" + ", ".join(map(str, s)) + "]"


@app.command("inspect")
@command
def inspect_cmd(checkpoint: CheckpointArg, arch: ArchOpt = None, json_out: JsonOpt = False):
    """Show every node: op, inputs, output shape, parameter shapes and counts."""
    model = load_model(checkpoint, arch)
    info = inspect_mod.describe(model)
    if json_out:
        emit_json(info)
        return
    title = f"{escape(info['name'] or '')} ({escape(info['source'])})".strip()
    table = Table(title=title, title_justify="left")
    for col in ("node", "op", "inputs", "output", "parameters", "count"):
        table.add_column(col, justify="right" if col == "count" else "left", overflow="fold")
    for spec_name, spec in info["inputs"].items():
        table.add_row(escape(spec_name), "input", "", _shape(spec["shape"]), spec["dtype"], "", style="dim")
    for n in info["nodes"]:
        params = " ".join(f"{r}{_shape(p['shape'])}" for r, p in n["params"].items())
        table.add_row(
            escape(n["name"]),
            n["op"],
            escape(", ".join(n["inputs"])),
            _shape(n["output_shape"]),
            params,
            f"{n['param_count']:,}" if n["param_count"] else "",
        )
    console.print(table)
    t = info["totals"]
    console.print(f"{t['nodes']} nodes, {t['parameters']:,} parameters in {t['tensors']} tensors; outputs: {escape(', '.join(info['outputs']))}")
