"""n2n diff: what changed between two checkpoints (nodes, tensor shapes, parameter counts)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..diff import diff_models, fmt_shape, growth
from . import app
from .common import escape  # rich's escape, and control characters in names made visible
from .common import ArchAOpt, ArchBOpt, ArchBothOpt, JsonOpt, command, console, emit_json, load_pair


@app.command("diff")
@command
def diff_cmd(
    a: Annotated[str, typer.Argument(help="The checkpoint before (e.g. the teacher); '-' reads standard input.", show_default=False)],
    b: Annotated[str, typer.Argument(help="The checkpoint after (e.g. the student); '-' reads standard input.", show_default=False)],
    arch_a: ArchAOpt = None,
    arch_b: ArchBOpt = None,
    arch: ArchBothOpt = None,
    values: Annotated[bool, typer.Option("--values", help="Also list same-shaped tensors whose values differ (reads every tensor).", rich_help_panel="Output")] = False,
    json_out: JsonOpt = False,
):
    """Show nodes added, removed or changed, tensors added, removed or reshaped, and parameter counts. Exit 0: it reports, it does not judge."""
    model_a, model_b = load_pair(a, b, arch_a, arch_b, arch)
    d = diff_models(model_a, model_b, values=values)
    if json_out:
        emit_json({"a": model_a.source, "b": model_b.source, **d.to_dict()})
        return
    _print(d, model_a.source, model_b.source)


def _print(d, source_a: str, source_b: str) -> None:
    console.print(f"[bold]{escape(source_a)}[/] → [bold]{escape(source_b)}[/]")
    if d.empty:
        console.print("no differences in nodes, tensor shapes or dtypes" + ("" if d.values_compared else " (values not compared; add --values)"))
    if d.nodes_added or d.nodes_removed or d.nodes_changed:
        t = Table(title="nodes", title_justify="left")
        for col in ("", "node", "op", "change"):
            t.add_column(col, overflow="fold")
        for n in d.nodes_added:
            t.add_row("[green]+[/]", escape(n["name"]), n["op"], escape("in: " + ", ".join(n["inputs"])))
        for n in d.nodes_removed:
            t.add_row("[red]-[/]", escape(n["name"]), n["op"], "")
        for n in d.nodes_changed:
            what = "; ".join(f"{k}: {v[0]!r} → {v[1]!r}" for k, v in n.changes.items())
            t.add_row("[yellow]~[/]", escape(n.name), "", escape(what))
        console.print(t)
    if d.tensors_added or d.tensors_removed or d.tensors_reshaped or d.tensors_values_changed:
        t = Table(title="tensors", title_justify="left")
        for col in ("", "key", "before", "after"):
            t.add_column(col, overflow="fold")
        for x in d.tensors_added:
            t.add_row("[green]+[/]", escape(x["key"]), "", f"{fmt_shape(x['shape'])} {x['dtype']}")
        for x in d.tensors_removed:
            t.add_row("[red]-[/]", escape(x["key"]), f"{fmt_shape(x['shape'])} {x['dtype']}", "")
        for x in d.tensors_reshaped:
            dt_old = f" {x.old_dtype}" if x.old_dtype != x.new_dtype else ""
            dt_new = f" {x.new_dtype}" if x.old_dtype != x.new_dtype else ""
            t.add_row("[yellow]~[/]", escape(x.key), fmt_shape(x.old_shape) + dt_old, fmt_shape(x.new_shape) + dt_new)
        for k in d.tensors_values_changed:
            t.add_row("[yellow]≠[/]", escape(k), "same shape", "new values")
        console.print(t)
    if d.inputs_changed:
        console.print("[yellow]the model inputs differ[/]")
    if d.outputs:
        console.print(f"[yellow]outputs differ[/]: {escape(', '.join(d.outputs[0]))} → {escape(', '.join(d.outputs[1]))}")
    p, n = d.parameters, d.nodes
    console.print(
        f"parameters {p['a']:,} → {p['b']:,} ({growth(p['a'], p['b'])}); nodes {n['a']} → {n['b']}; "
        f"tensors +{len(d.tensors_added)} -{len(d.tensors_removed)} ~{len(d.tensors_reshaped)}"
    )
