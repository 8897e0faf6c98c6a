"""n2n verify: do two checkpoints compute the same function?"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..errors import N2NError
from . import app
from .common import (
    AllowNonfiniteOpt, ArchAOpt, ArchBOpt, ArchBothOpt, AtolOpt, DeviceChoice, DeviceOpt, JsonOpt, ProbesOpt, RtolOpt,
    SeedOpt, command, emit_json, load_pair, print_verify, OutputsOnlyOpt, report_verify_failure,
)


@app.command("verify")
@command
def verify_cmd(
    a: Annotated[str, typer.Argument(help="Reference checkpoint (e.g. the teacher); '-' reads standard input.", show_default=False, metavar="A")],
    b: Annotated[Optional[str], typer.Argument(help="Checkpoint to compare (e.g. the student); '-' reads standard input. Not with --module.", show_default=False, metavar="B")] = None,
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
    module: Annotated[Optional[str], typer.Option("--module", help="MODULE:FACTORY: check A's architecture against this torch.nn.Module, run with A's tensors (load_state_dict, strict).", show_default=False, rich_help_panel="Model")] = None,
):
    """Run A and B on the same random probes; exit 0 when every output agrees within tolerance, 1 when not.

    Every value inside the models whose node name and shape both share is compared too, by the same rule (--outputs-only: the outputs alone). NaN or Inf in an output never agrees. With --module MODULE:FACTORY, A alone is run against the module built by FACTORY holding A's tensors.
    """
    if module is not None:
        return _verify_module(module, a, b, arch_a or arch, probes, seed, atol, rtol, json_out, allow_nonfinite)
    if b is None:
        raise N2NError("missing argument B: give the checkpoint to compare with A, or --module MODULE:FACTORY")
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


def _verify_module(spec: str, ckpt: str, b: Optional[str], arch: Optional[str], probes: int, seed: int, atol, rtol,
                   json_out: bool, allow_nonfinite: bool) -> None:
    """`n2n verify --module`: the checkpoint's architecture against the module it claims to describe,
    both holding the checkpoint's tensors, on the same probes (exit 1 when they differ)."""
    from ..guards import check_finite
    from ..importer import compare_with_module, load_tensors_into, module_from_factory
    from ..model import load_model

    if b is not None:
        raise N2NError(f"--module compares one checkpoint with its module; drop B ('{b}') or drop --module")
    model = load_model(ckpt, arch)
    check_finite(model, allow_nonfinite)
    module = module_from_factory(spec)
    load_tensors_into(module, model, spec)
    result = compare_with_module(module, model, probes=probes, seed=seed, atol=atol, rtol=rtol)
    if json_out:
        emit_json(result.to_dict())
    else:
        print_verify(result)
    if not result.passed:
        raise typer.Exit(1)
