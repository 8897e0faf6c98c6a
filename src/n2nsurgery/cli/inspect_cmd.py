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
    if info["history"]:
        _print_history(info["history"])


def _print_history(history: list) -> None:
    """The checkpoint's lineage (n2n.history): one row per surgery step ever applied, oldest first."""
    table = Table(title="history (n2n.history)", title_justify="left")
    for col in ("#", "op", "arguments", "seed", "via", "version", "verified: max |Δ|"):
        table.add_column(col, justify="right" if col in ("#", "seed") else "left", overflow="fold")
    for i, step in enumerate(history, 1):
        if not isinstance(step, dict):  # written by something else: show it, do not fail
            table.add_row(str(i), "?", escape(str(step)), "", "", "", "")
            continue
        args = step.get("args") or {}
        args_text = " ".join(f"{k}={v}" for k, v in args.items()) if isinstance(args, dict) else str(args)
        recipe = step.get("recipe")
        via = step.get("command", "")
        if isinstance(recipe, dict):
            via = f"{via} {recipe.get('file', '?')}:{recipe.get('step', '?')}".strip()
        v = step.get("verification")
        if isinstance(v, dict):
            verdict = "pass" if v.get("passed") else "FAIL"
            err = v.get("max_abs")
            err = f"{err:.3g}" if isinstance(err, (int, float)) else "?"
            verified = f"{verdict} {err} ({v.get('probes')} probes, {v.get('device')})"
        else:
            verified = "not verified"
        table.add_row(str(i), escape(str(step.get("op", "?"))), escape(args_text), str(step.get("seed", "")),
                      escape(str(via)), escape(str(step.get("version", ""))), escape(verified))
    console.print(table)
