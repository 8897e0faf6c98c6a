"""n2n import: trace a torch.nn.Module (MODULE:FACTORY) and write a checkpoint carrying its architecture."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from ..errors import N2NError
from . import app
from .common import (
    AllowNonfiniteOpt, AtolOpt, JsonOpt, OverwriteInputOpt, ProbesOpt, RtolOpt, SeedOpt, check_json_target,
    command, console, emit_json, escape, print_verify, print_written,
)


@app.command("import")
@command
def import_cmd(
    factory: Annotated[str, typer.Argument(help="MODULE:FACTORY, e.g. mypkg.models:MyNet: FACTORY (a function or class) is called with no arguments and returns the torch.nn.Module.", show_default=False, metavar="MODULE:FACTORY")],
    input_shape: Annotated[str, typer.Option("--input-shape", help="One sample's input shape, no batch axis, e.g. 3,32,32.", show_default=False)],
    output: Annotated[Optional[str], typer.Option("-o", "--output", help="Output checkpoint; '-' writes to standard output.", show_default=False)] = None,
    input_dtype: Annotated[str, typer.Option("--input-dtype", help="The input's dtype: float32 or float64.")] = "float32",
    input_name: Annotated[str, typer.Option("--input-name", help="The architecture's input name.")] = "x",
    arch_out: Annotated[Optional[str], typer.Option("--arch-out", help="Also write the architecture YAML to this file.", show_default=False)] = None,
    probes: ProbesOpt = 16,
    seed: SeedOpt = 0,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    json_out: JsonOpt = False,
    overwrite_input: OverwriteInputOpt = False,
    allow_nonfinite: AllowNonfiniteOpt = False,
):
    """Trace MODULE:FACTORY with torch.fx and write it as a checkpoint carrying its architecture.

    Node names are the module paths, so the tensors keep the module's own state_dict keys. Before writing, the module (eval mode) and the imported architecture run on the same probes: exit 1 when they differ, and nothing is written.
    """
    import torch  # torch: only once a command runs

    from ..commit import commit
    from ..importer import import_checked, module_from_factory, parse_input_shape
    from ..surgery import history_step, verification_summary

    if output is None:
        raise N2NError("missing option -o/--output: give the checkpoint to write")
    check_json_target(json_out, output)
    if input_dtype not in ("float32", "float64"):
        raise N2NError(f"--input-dtype '{input_dtype}': give float32 or float64")
    shape = parse_input_shape(input_shape)
    module = module_from_factory(factory)
    example = torch.randn((2,) + shape, dtype=getattr(torch, input_dtype), generator=torch.Generator().manual_seed(seed))
    model, result = import_checked(module, example, input_name=input_name, probes=probes, seed=seed, atol=atol, rtol=rtol)
    step = history_step("import", {"factory": factory, "input_shape": list(shape), "input_dtype": input_dtype}, seed)
    step["verification"] = verification_summary(result)
    model = model.replace(step=step)
    commit(model, model, output, result=result, overwrite_input=overwrite_input, allow_nonfinite=allow_nonfinite)
    if arch_out is not None:
        write_text_atomic(arch_out, model.arch.to_yaml())
    if json_out:
        emit_json({"factory": factory, "nodes": len(model.arch.nodes), "output": output, "arch_out": arch_out,
                   "verification": result.to_dict()})
        return
    console.print(f"imported {escape(factory)}: {len(model.arch.nodes)} nodes, {model.parameter_count():,} parameters")
    print_verify(result)
    print_written(output, False)
    if arch_out is not None:
        console.print(f"wrote {escape(arch_out)}")


def write_text_atomic(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, then a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise N2NError(f"--arch-out {path}: the folder {folder} does not exist")
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise N2NError(f"--arch-out {path}: cannot write ({e.strerror})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
