"""n2n verify: do two checkpoints compute the same function?"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..errors import N2NError
from ..model import load_model
from ..verify import verify
from . import app
from ..guards import check_finite
from .common import AllowNonfiniteOpt, AtolOpt, DeviceChoice, DeviceOpt, JsonOpt, ProbesOpt, RtolOpt, SeedOpt, command, emit_json, print_verify


@app.command("verify")
@command
def verify_cmd(
    a: Annotated[str, typer.Argument(help="Reference checkpoint (e.g. the teacher); '-' reads standard input.", show_default=False, metavar="A")],
    b: Annotated[str, typer.Argument(help="Checkpoint to compare (e.g. the student); '-' reads standard input.", show_default=False, metavar="B")],
    arch_a: Annotated[Optional[str], typer.Option("--arch-a", help="Architecture of A (optional if A carries one).", rich_help_panel="Model")] = None,
    arch_b: Annotated[Optional[str], typer.Option("--arch-b", help="Architecture of B (optional if B carries one; else --arch-a is used).", rich_help_panel="Model")] = None,
    arch: Annotated[Optional[str], typer.Option("--arch", help="Architecture for both, where --arch-a/--arch-b are not given.", rich_help_panel="Model")] = None,
    probes: ProbesOpt = 64,
    seed: SeedOpt = 0,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    device: DeviceOpt = DeviceChoice.auto,
    json_out: JsonOpt = False,
    allow_nonfinite: AllowNonfiniteOpt = False,
):
    """Run A and B on the same random probes; exit 0 when every output agrees within tolerance, 1 when not."""
    if a == "-" and b == "-":
        raise N2NError("only one of A and B can be '-' (standard input)")
    arch_a = arch_a or arch
    model_a = load_model(a, arch_a)
    model_b = load_model(b, arch_b or arch, fallback_arch=arch_a)
    check_finite(model_a, allow_nonfinite)  # NaN in both would "match" and pass
    check_finite(model_b, allow_nonfinite)
    result = verify(model_a, model_b, probes=probes, seed=seed, atol=atol, rtol=rtol, device=device.value)
    if json_out:
        emit_json(result.to_dict())
    else:
        print_verify(result)
    if not result.passed:
        raise typer.Exit(1)
