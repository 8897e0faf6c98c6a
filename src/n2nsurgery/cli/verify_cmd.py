"""n2n verify: do two checkpoints compute the same function?"""

from __future__ import annotations

from typing import Annotated

import typer

from . import app
from .common import (
    AllowNonfiniteOpt, ArchAOpt, ArchBOpt, ArchBothOpt, AtolOpt, DeviceChoice, DeviceOpt, JsonOpt, ProbesOpt, RtolOpt,
    SeedOpt, command, emit_json, load_pair, print_verify, OutputsOnlyOpt, report_verify_failure,
)


@app.command("verify")
@command
def verify_cmd(
    a: Annotated[str, typer.Argument(help="Reference checkpoint (e.g. the teacher); '-' reads standard input.", show_default=False, metavar="A")],
    b: Annotated[str, typer.Argument(help="Checkpoint to compare (e.g. the student); '-' reads standard input.", show_default=False, metavar="B")],
    arch_a: ArchAOpt = None,
    arch_b: ArchBOpt = None,
    arch: ArchBothOpt = None,
    probes: ProbesOpt = 64,
    seed: SeedOpt = 0,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    device: DeviceOpt = DeviceChoice.auto,
    json_out: JsonOpt = False,
    allow_nonfinite: AllowNonfiniteOpt = False,
    outputs_only: OutputsOnlyOpt = False,
):
    """Run A and B on the same random probes; exit 0 when every output agrees within tolerance, 1 when not.

    Every value inside the models whose node name and shape both share is compared too, by the same rule (--outputs-only: the outputs alone). NaN or Inf in an output never agrees.
    """
    from ..blocks import history_renames  # torch: only once a command runs
    from ..guards import check_finite
    from ..verify import verify

    model_a, model_b = load_pair(a, b, arch_a, arch_b, arch)
    check_finite(model_a, allow_nonfinite)  # NaN in both would "match" and pass
    check_finite(model_b, allow_nonfinite)
    result = verify(model_a, model_b, probes=probes, seed=seed, atol=atol, rtol=rtol, device=device.value,
                    intermediates=not outputs_only, renames=history_renames(model_a, model_b))
    if json_out:
        emit_json(result.to_dict())
    else:
        print_verify(result)
        if not result.passed:
            report_verify_failure(result)
    if not result.passed:
        raise typer.Exit(1)
