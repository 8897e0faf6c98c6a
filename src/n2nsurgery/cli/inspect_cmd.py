"""n2n inspect: a table of nodes, shapes and parameters."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from .. import inspect as inspect_mod
from ..model import load_model
from ..ops import get_op
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
    for col in ("node", "op", "inputs", "output", "parameters", "count", "widen group", "deepen after"):
        table.add_column(col, justify="right" if col == "count" else "left", overflow="fold")
    for spec_name, spec in info["inputs"].items():
        table.add_row(escape(spec_name), "input", "", _shape(spec["shape"]), spec["dtype"], "", "", "", style="dim")
    for n in info["nodes"]:
        params = _params_cell(n["op"], n["params"])
        table.add_row(
            escape(n["name"]),
            n["op"],
            escape(", ".join(n["inputs"])),
            _shape(n["output_shape"]),
            params,
            f"{n['param_count']:,}" if n["param_count"] else "",
            _widen_cell(n["widen"]),
            n["deepen_after"],
        )
    console.print(table)
    t = info["totals"]
    console.print(f"{t['nodes']} nodes, {t['parameters']:,} parameters in {t['tensors']} tensors; outputs: {escape(', '.join(info['outputs']))}")
    if info["history"]:
        _print_history(info["history"])


def _params_cell(op: str, params: dict) -> str:
    """Roles with their shapes, short, as the op's ``show_params`` writes them ('weight[8, 3, 3, 3]
    bias[8]'; batchnorm's four per-channel vectors as '4×[8]'); every role is in --json."""
    return get_op(op).show_params({r: tuple(p["shape"]) for r, p in params.items()})


def _widen_cell(widen) -> str:
    """The layers that widen together with this one, or why it cannot be widened."""
    if widen is None:
        return ""
    if "group" in widen:
        return escape("yes, with " + ", ".join(widen["group"][1:]) if len(widen["group"]) > 1 else "yes")
    return "[dim]no: " + escape(widen["refused"].split(": ", 1)[-1]) + "[/]" if "reaches model output" not in widen["refused"] else "[dim]no (output)[/]"


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
        # None means "the default" in a step's arguments: leave it out of the table (JSON keeps it)
        args_text = " ".join(f"{k}={v}" for k, v in args.items() if v is not None) if isinstance(args, dict) else str(args)
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
