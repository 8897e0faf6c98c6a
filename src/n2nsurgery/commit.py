"""The safety chain every written student goes through, for the CLI, recipes and Python users alike.

A surgery (:func:`~n2nsurgery.widen.widen`, :func:`~n2nsurgery.deepen.deepen`, a recipe) only
*plans* a student in memory. :func:`commit` is what makes it a file, and it checks, in order:

1. **the output** (:func:`~n2nsurgery.guards.check_output`): ``out`` must not name an input
   (unless ``overwrite_input``) and its folder must exist;
2. **finiteness** (:func:`~n2nsurgery.guards.check_finite`): the teacher's parameters hold no NaN
   or Inf (unless ``allow_nonfinite``);
3. **verification** (:func:`~n2nsurgery.surgery.check_student`): teacher and student on the same
   probes, every output and every value the surgery kept (same node name, same shape); a teacher
   whose outputs are not finite cannot vouch for anything and is refused;
4. **the atomic write** (:func:`~n2nsurgery.model.save_model`): temporary file, then rename; not
   done on a dry run.

The CLI runs steps 1 and 2 once more before the plan (:func:`preflight`), so a refusal comes
before the work; they are cheap, and :func:`commit` does not trust its caller to have run them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional

if TYPE_CHECKING:  # importing verify pulls in torch: not needed to load this module
    from .verify import VerifyResult


@dataclass
class CommitResult:
    """What :func:`commit` checked and wrote."""

    verification: Optional[VerifyResult]  # None when not verified (verify=False)
    noise_deviation: Optional[dict]  # widen with noise: {"max_abs", "max_rel"} of the noisy student
    output: Optional[str]  # the path written, or on a dry run the path that would have been; None: no out
    written: bool  # False on a dry run or without `out`
    dry_run: bool

    def to_dict(self) -> dict:
        return {
            "output": self.output,
            "written": self.written,
            "dry_run": self.dry_run,
            "verification": self.verification.to_dict() if self.verification is not None else None,
            "noise_deviation": self.noise_deviation,
        }


def preflight(teacher, out: Optional[str] = None, *, overwrite_input: bool = False, allow_nonfinite: bool = False,
              max_shard_size: Optional[int] = None, extra_inputs: Iterable[str] = (),
              output_format: Optional[str] = None) -> None:
    """Steps 1 and 2 of the chain: refuse a bad output path and a non-finite teacher, before any work.

    Args:
        teacher: the model the student is made from.
        out: the output path (``-`` is standard output); None checks no output.
        overwrite_input: allow `out` to name an input (it is replaced atomically).
        allow_nonfinite: go ahead although the teacher's parameters hold NaN or Inf.
        max_shard_size: set when `out` is a sharded checkpoint folder.
        extra_inputs: other files the run read (a recipe), which `out` must not name either.
        output_format: ``"n2n"``, ``"hf"`` or None (a Hugging Face folder when the teacher was
            read from one; see :func:`~n2nsurgery.hf_folder.writes_folder`).

    Raises:
        N2NError: the output names an input or its folder is missing; the teacher is not finite.
    """
    from .guards import check_finite, check_output, input_paths
    from .hf_folder import check_output_folder, writes_folder

    if writes_folder(teacher, out, output_format):
        check_output_folder(out, input_paths(teacher) + list(extra_inputs), overwrite_input, teacher.hf.folder)
    elif out is not None:
        check_output(out, input_paths(teacher) + list(extra_inputs), overwrite_input, folder=max_shard_size is not None)
    check_finite(teacher, allow_nonfinite)


def commit(teacher, student, out: Optional[str] = None, *, verify: bool = True, probes: int = 64, seed: int = 0,
           device: str = "auto", atol: Optional[float] = None, rtol: Optional[float] = None,
           outputs_only: bool = False, noise_free=None, result: Optional[VerifyResult] = None,
           what: str = "the surgery", dry_run: bool = False, max_shard_size: Optional[int] = None,
           overwrite_input: bool = False, allow_nonfinite: bool = False, extra_inputs: Iterable[str] = (),
           renames: Optional[dict] = None, output_format: Optional[str] = None) -> CommitResult:
    """Check `student` against `teacher` and write it to `out`: the whole safety chain in one call.

    Args:
        teacher: the model the surgery started from (:class:`~n2nsurgery.model.Model`).
        student: the surgery's result.
        out: where to write the student (a ``.safetensors`` path, a folder with `max_shard_size`,
            ``-`` for standard output). None runs the checks only.
        verify: compare the two models on random probes before writing (docs/commands.md#verify).
        probes, seed, device, atol, rtol: as for :func:`~n2nsurgery.verify.verify`.
        outputs_only: compare the outputs only, not the values inside the models.
        noise_free: a widening with the paper's noise: the same widening without it, which is
            held to the strict tolerance while the noise's deviation is measured
            (:func:`~n2nsurgery.surgery.check_noisy_widening`).
        result: a verification the caller ran already (a recipe verifies step by step); it is
            used instead of verifying again.
        what: how failure messages name the surgery (``"widening 'fc1'"``).
        dry_run: do every check, write nothing (the result still names `out`).
        max_shard_size: write a sharded checkpoint folder of shards of at most this many bytes.
        overwrite_input: allow `out` to name an input file.
        allow_nonfinite: go ahead although the teacher's parameters hold NaN or Inf.
        extra_inputs: other files the run read, which `out` must not name.
        renames: teacher node name -> student node name for nodes the surgery renamed (a block
            deepening's renumbered blocks), so verification compares each with its original.
        output_format: ``"n2n"`` writes an n2n checkpoint even for a Hugging Face folder input;
            ``"hf"`` insists on a folder; None: a folder when the teacher was read from one.

    Returns:
        A :class:`CommitResult`: the verification (with ``intermediates``, the worst value inside),
        the noise deviation, and what was written.

    Raises:
        N2NError: the output or the teacher is refused, or the teacher's outputs are NaN/Inf on
            the probes (exit 2 in the CLI).
        VerificationFailed: the student does not compute the teacher's function; nothing is
            written (exit 1).

    Example:
        >>> import n2nsurgery as n2n
        >>> from n2nsurgery.widen import widen
        >>> teacher = n2n.load_model("recipes/mlp.safetensors", "recipes/mlp.yaml")
        >>> student, report = widen(teacher, "fc1", 64)
        >>> done = n2n.commit(teacher, student, "mlp-wide.safetensors")
        >>> done.verification.passed, done.written
        (True, True)
    """
    from .model import save_model
    from .surgery import check_noisy_widening, check_student

    preflight(teacher, out, overwrite_input=overwrite_input, allow_nonfinite=allow_nonfinite,
              max_shard_size=max_shard_size, extra_inputs=extra_inputs, output_format=output_format)
    _check_folder_student(teacher, student, out, output_format)
    deviation = None
    if result is None and verify:
        settings = dict(probes=probes, seed=seed, device=device, atol=atol, rtol=rtol, what=what, intermediates=not outputs_only)
        if noise_free is not None:
            result, deviation = check_noisy_widening(teacher, student, noise_free, **settings)
        else:
            result = check_student(teacher, student, renames=renames, **settings)
    written = out is not None and not dry_run
    if written:
        save_model(student, out, max_shard_size=max_shard_size, output_format=output_format)
    return CommitResult(result, deviation, out, written, dry_run)


def _check_folder_student(teacher, student, out, output_format) -> None:
    """A Hugging Face folder is written only for a student its config.json describes: refused
    before the verification, not after it."""
    from .hf_folder import check_describes, student_config, writes_folder

    if writes_folder(teacher, out, output_format) and getattr(student, "hf", None) is not None:
        check_describes(student, student_config(student))
