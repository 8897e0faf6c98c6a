"""What every surgery step shares: its history record and its verification against the teacher."""

from __future__ import annotations

from typing import Optional

from . import __version__
from .errors import VerificationFailed
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
                  atol: Optional[float] = None, rtol: Optional[float] = None, what: str = "the surgery") -> VerifyResult:
    """Verify `student` against `teacher`; record the figures in the student's last history step.

    Raises:
        VerificationFailed: the student differs from the teacher beyond tolerance.
    """
    result = verify(teacher, student, probes=probes, seed=seed, atol=atol, rtol=rtol, device=device)
    if student.history:
        student.history[-1] = dict(student.history[-1], verification=verification_summary(result))
    if not result.passed:
        worst = max(result.outputs, key=lambda o: o.max_abs / o.bound if o.bound else float("inf"))
        raise VerificationFailed(
            f"{what} is not function-preserving: output {worst.name!r} differs by {worst.max_abs:.3g} "
            f"(allowed {worst.bound:.3g}); nothing was written",
            result,
        )
    return result
