"""n2n inspect: a table of nodes, shapes and parameters."""

from __future__ import annotations

from typing import Optional

from rich import box
from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

from . import app
from .common import escape  # rich's escape, and control characters in names made visible
from .common import ArchOpt, CheckpointArg, JsonOpt, command, console, emit_json


def _shape(s) -> str:
    return "[" + ", ".join(map(str, s)) + "]"


@app.command("inspect")
@command
def inspect_cmd(checkpoint: CheckpointArg, arch: ArchOpt = None, json_out: JsonOpt = False):
    """Show every node: op, inputs, output shape, parameter shapes and counts."""
    from .. import inspect as inspect_mod  # torch: only once a command runs
    from ..model import load_model

    model = load_model(checkpoint, arch)
    info = inspect_mod.describe(model)
    if json_out:
        emit_json(info)
        return
    if "hf" in info:
        _print_hf_summary(info["hf"])
    title = f"{escape(info['name'] or '')} ({escape(info['source'])})".strip()
    rows = []
    for spec_name, spec in info["inputs"].items():
        rows.append(([escape(spec_name), "input", "", _shape(spec["shape"]), spec["dtype"], "", "", ""], "dim"))
    for n in info["nodes"]:
        params = _params_cell(n["op"], n["params"])
        rows.append(([
            escape(n["name"]),
            n["op"],
            escape(", ".join(n["inputs"])),
            _shape(n["output_shape"]),
            params,
            f"{n['param_count']:,}" if n["param_count"] else "",
            _widen_cell(n["widen"]),
            n["deepen_after"].replace("+", " + "),  # (a place to wrap at: "identity +" / "relu")
        ], None))
    console.print(_node_table(title, rows, console.width))
    t = info["totals"]
    console.print(f"{t['nodes']} nodes, {t['parameters']:,} parameters in {t['tensors']} tensors; outputs: {escape(', '.join(info['outputs']))}")
    if info["history"]:
        _print_history(info["history"])


def _print_hf_summary(hf: dict) -> None:
    """The config-level view of a Hugging Face folder, before the node table."""
    sizes = ", ".join(f"{k} {v}" for k, v in hf["sizes"].items() if v is not None)
    classes = ", ".join(hf["architectures"] or []) or "?"
    console.print(f"[bold]{escape(hf['family'])}[/] ({escape(classes)}): {escape(sizes)}")
    console.print(f"{hf['parameters']:,} parameters, {escape(', '.join(hf['dtypes']))}, lm_head "
                  f"{'tied to the embedding' if hf['tied'] else 'untied'}, {hf['layout']}")


_COLUMNS = ("node", "op", "inputs", "output", "parameters", "count", "widen group", "deepen after")
# Short columns never wrap (a name or an op is one token); the long ones wrap at the spaces
# after commas. Rich's overflow="fold" broke tokens anywhere ("batchno/rm") at 80 columns.
_NO_WRAP = ("node", "op", "count")


def _node_table(title: str, rows: list, width: int) -> Table:
    """The node table for a console `width` wide: no vertical rules, one space between columns,
    and column widths that keep every token whole where they can (see :func:`_fit`)."""
    columns = list(_COLUMNS)
    widths = _fit(columns, [cells for cells, _ in rows], width)
    if widths is None:  # too narrow: the parameter count is the column to spare (totals follow)
        keep = [i for i, c in enumerate(columns) if c != "count"]
        columns = [columns[i] for i in keep]
        rows = [([cells[i] for i in keep], style) for cells, style in rows]
        widths = _fit(columns, [cells for cells, _ in rows], width)
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 0), show_edge=False)
    for i, col in enumerate(columns):
        table.add_column(col, justify="right" if col == "count" else "left", no_wrap=col in _NO_WRAP,
                         width=widths[i] if widths else None)
    for cells, style in rows:
        table.add_row(*cells, style=style)
    return table


def _fit(columns: list, rows: list, width: int) -> Optional[list]:
    """Column widths within `width` that split no token (no-wrap columns whole, others no
    narrower than their longest word), the spare room shared in proportion to what each column
    lacks of its full width; None when even that does not fit. Rich's own squeezing ignores
    words, so it is left only the hopeless case."""
    texts = [[col] + [Text.from_markup(row[i]).plain for row in rows] for i, col in enumerate(columns)]
    full = [max(cell_len(t) for t in col) for col in texts]
    word = [max((cell_len(w) for t in col for w in t.split()), default=1) for col in texts]
    need = [f if c in _NO_WRAP else w for c, f, w in zip(columns, full, word)]
    spare = width - (len(columns) - 1) - sum(need)  # (one space between columns)
    if spare < 0:
        return None
    lack = [f - n for f, n in zip(full, need)]
    if sum(lack) <= spare:
        return full
    return [n + m * spare // sum(lack) for n, m in zip(need, lack)]


def _params_cell(op: str, params: dict) -> str:
    """Roles with their shapes, short, as the op's ``show_params`` writes them ('weight[8, 3, 3, 3]
    bias[8]'; batchnorm's four per-channel vectors as '4×[8]'); every role is in --json."""
    from ..ops import get_op  # torch: only once a command runs

    return get_op(op).show_params({r: tuple(p["shape"]) for r, p in params.items()})


def _widen_cell(widen) -> str:
    """The layers that widen together with this one, or why it cannot be widened."""
    if widen is None:
        return ""
    if "group" in widen:
        yes = f"yes (width a multiple of {widen['multiple_of']})" if "multiple_of" in widen else "yes"
        return escape(f"{yes}, with " + ", ".join(widen["group"][1:]) if len(widen["group"]) > 1 else yes)
    return "[dim]no: " + escape(widen["refused"].split(": ", 1)[-1]) + "[/]" if "reaches model output" not in widen["refused"] else "[dim]no (output)[/]"


def _print_history(history: list) -> None:
    """The checkpoint's lineage (n2n.history): one row per surgery step ever applied, oldest first."""
    table = Table(title="history (n2n.history)", title_justify="left")
    for col in ("#", "op", "arguments", "seed", "via", "version", "verified: max |Δ|"):
        table.add_column(col, justify="right" if col in ("#", "seed") else "left", overflow="fold", no_wrap=col in ("#", "op", "seed"))
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
        table.add_row(str(i), escape(str(step.get("op", "?"))), escape(args_text), escape(str(step.get("seed", ""))),
                      escape(str(via)), escape(str(step.get("version", ""))), escape(verified))
    console.print(table)
