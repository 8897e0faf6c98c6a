"""What every surgery step shares: its history record and its verification against the teacher."""

from __future__ import annotations

from typing import Optional

from . import __version__
from .errors import N2NError, VerificationFailed
from .verify import VerifyResult, verify


def history_step(op: str, args: dict, seed: int) -> dict:
    """One ``n2n.history`` entry. No timestamps: the same run must give the same bytes."""
    return {"op": op, "args": dict(args), "seed": seed, "version": __version__, "verification": None}


def verification_summary(result: Optional[VerifyResult]) -> Optional[dict]:
    if result is None:
        return None
    return {
        "passed": result.passed,
        "max_abs": result.max_abs,
        "max_rel": result.max_rel,
        "probes": result.probes,
        "device": result.device.split(" ")[0],  # "cuda" or "cpu": the card name would break same-bytes
        "atol": result.atol,
        "rtol": result.rtol,
    }


def check_student(teacher, student, *, probes: int = 64, seed: int = 0, device: str = "auto",
                  atol: Optional[float] = None, rtol: Optional[float] = None, what: str = "the surgery",
                  intermediates: bool = True, renames: Optional[dict] = None) -> VerifyResult:
    """Verify `student` against `teacher`; record the figures in the student's last history step.

    Outputs and (unless `intermediates` is false) every value the surgery kept (same node name,
    same shape) are compared; see :func:`n2nsurgery.verify.verify`.

    Raises:
        N2NError: the teacher's own outputs are NaN or Inf on the probes, so nothing can show
            the student computes the same function (exit 2: the input is at fault).
        VerificationFailed: the student differs from the teacher beyond tolerance.
    """
    result = verify(teacher, student, probes=probes, seed=seed, atol=atol, rtol=rtol, device=device,
                    intermediates=intermediates, renames=renames)
    _refuse_nonfinite_teacher(teacher, result)
    if student.history:
        student.history[-1] = dict(student.history[-1], verification=verification_summary(result))
    if not result.passed:
        reason = result.describe_failure("the teacher", "the student")
        raise VerificationFailed(f"{what} is not function-preserving: {reason}; nothing was written", result)
    return result


def _refuse_nonfinite_teacher(teacher, result: VerifyResult) -> None:
    for o in result.outputs:
        if o.nonfinite_a:
            raise N2NError(
                f"{teacher.source}: the teacher's output {o.name!r} is NaN/Inf on the probes ({o.nonfinite_a} of {o.numel} "
                "values), so the student cannot be verified; fix the checkpoint or pass --no-verify"
            )


def check_noisy_widening(teacher, student, noise_free, *, probes: int = 64, seed: int = 0, device: str = "auto",
                         atol: Optional[float] = None, rtol: Optional[float] = None, what: str = "the widening",
                         intermediates: bool = True) -> tuple:
    """Check a widening with the paper's noise, which is not exact by design.

    The noise-free widening (same map, same split) must pass strictly, at the dtype's default
    tolerance, intermediates included (unless `intermediates` is false). Then the deviation the noise adds is measured; it is judged only against a
    tolerance the user gives (`atol`/`rtol`), otherwise it is only reported. The figures go into
    the student's last history step.

    Returns:
        ``(result, deviation)``: the strict result of the noise-free student, and
        ``{"max_abs", "max_rel"}`` of the noisy one against the teacher.

    Raises:
        VerificationFailed: the noise-free widening is not exact, or the noise moves the outputs
            beyond a given tolerance.
    """
    result = check_student(teacher, noise_free, probes=probes, seed=seed, device=device, what=what, intermediates=intermediates)
    # The noise moves values inside by design; the user's tolerance is about the function, so only
    # the outputs are measured (the noise-free check above compared the intermediates too).
    measured = verify(teacher, student, probes=probes, seed=seed, atol=atol, rtol=rtol, device=device, intermediates=False)
    deviation = {"max_abs": measured.max_abs, "max_rel": measured.max_rel}
    if student.history:
        student.history[-1] = dict(student.history[-1], verification=dict(verification_summary(result), noise_deviation=deviation))
    if (atol is not None or rtol is not None) and not measured.passed:
        raise VerificationFailed(
            f"{what}: the noise moves the outputs by {measured.max_abs:.3g}, beyond the given tolerance; nothing was written",
            measured,
        )
    return result, deviation
