"""Pieces every command shares: option types, error handling, output consoles, surgery reports."""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from enum import Enum
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape as escape_markup
from rich.table import Table

from ..errors import N2NError, VerificationFailed, has_unprintable, printable
from ..recipe import SEED_LIMIT
from .group import INTERRUPTED, say


class _Stderr:
    """``sys.stderr`` as it is at each write (tests swap it), for rich; failed writes are dropped.

    Reports and tables are for people: a closed or full stderr (``2>&-``, ``2>/dev/full``) loses
    them but must not turn a finished surgery into a failure.
    """

    def write(self, text: str) -> int:
        try:
            sys.stderr.write(text)
        except (AttributeError, OSError, ValueError):
            pass
        return len(text)

    def flush(self) -> None:
        try:
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):
            pass

    def isatty(self) -> bool:
        try:
            return sys.stderr.isatty()
        except (AttributeError, OSError, ValueError):
            return False

    def fileno(self) -> int:
        return sys.stderr.fileno()  # (rich asks only on Windows, and tolerates a failure)

    @property
    def encoding(self) -> str:
        return getattr(sys.stderr, "encoding", None) or "utf-8"


def make_console(**kwargs) -> Console:
    """A rich console on stderr. Under NO_COLOR (any non-empty value, no-color.org) it writes no
    escape sequence at all: rich on its own drops only the colours and keeps bold and italic."""
    plain = {"color_system": None} if os.environ.get("NO_COLOR") else {}
    return Console(file=_Stderr(), **plain, **kwargs)


# Human output goes to stderr; stdout is for --json and for checkpoints written to '-'.
# Piped or captured stderr gets a wide fixed width, so tables in CI logs are not squeezed to 80.
console = make_console(highlight=False, width=None if _Stderr().isatty() else 160)


def escape(text) -> str:
    """A name or path for rich output: control characters made visible (see
    :func:`~n2nsurgery.errors.printable`), then rich markup escaped. Every command module uses
    this one, not rich's own ``escape``, so no name from a file or argv reaches the terminal raw.
    """
    return escape_markup(printable(text))


class State:
    debug: bool = bool(os.environ.get("N2N_DEBUG"))
    quiet: bool = False  # --quiet: nothing on stderr but errors (no progress bars, no reports)

    def configure(self, debug: bool, quiet: bool = False) -> None:
        """Set per invocation, never sticky: one `--debug` run must not leak into the next
        (tests and library users call the app many times in one process)."""
        from .. import progress

        self.debug = debug or bool(os.environ.get("N2N_DEBUG"))
        self.quiet = quiet
        console.quiet = quiet
        progress.set_quiet(quiet)


state = State()


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


# ------------------------------------------------------------------------------- option types

CheckpointArg = Annotated[str, typer.Argument(help="Safetensors checkpoint, a sharded one (its folder or index .json), or a Hugging Face model folder (config.json beside the tensors); '-' reads standard input.", show_default=False, metavar="CKPT")]
ArchOpt = Annotated[
    Optional[str],
    typer.Option("--arch", help="Architecture YAML. Optional once the checkpoint has been through n2n (it carries its own); given both, this wins.", rich_help_panel="Model"),
]
OutputOpt = Annotated[Optional[str], typer.Option("-o", "--output", help="Output checkpoint (a folder with --max-shard-size); '-' writes to standard output. Required unless --dry-run.", rich_help_panel="Output", show_default=False)]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Do the whole plan and the verification, print the report, write nothing (-o optional; if given, it is checked as for a real run).", rich_help_panel="Output")]
OutputsOnlyOpt = Annotated[bool, typer.Option("--outputs-only", help="Compare the model outputs only, not every value inside the models that the surgery kept (same node name and shape).", rich_help_panel="Verification")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=SEED_LIMIT - 1, help="Seed for every random choice: same seed, same bytes out.", rich_help_panel="Randomness")]
DeviceOpt = Annotated[DeviceChoice, typer.Option("--device", help="Where to verify: auto is the GPU when one is present.", rich_help_panel="Verification")]
ProbesOpt = Annotated[int, typer.Option("--probes", min=1, help="Random probe samples per input.", rich_help_panel="Verification")]
AtolOpt = Annotated[Optional[float], typer.Option("--atol", min=0.0, help="Absolute tolerance (default by dtype: float32 1e-5).", rich_help_panel="Verification", show_default=False)]
RtolOpt = Annotated[Optional[float], typer.Option("--rtol", min=0.0, help="Tolerance relative to max|y_A| (default by dtype: float32 1e-4).", rich_help_panel="Verification", show_default=False)]
VerifyOpt = Annotated[bool, typer.Option("--verify/--no-verify", help="Check the student computes the teacher's function before writing.", rich_help_panel="Verification")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON on standard output.", rich_help_panel="Output")]
OverwriteInputOpt = Annotated[bool, typer.Option("--overwrite-input", help="Allow -o to name an input file: it is replaced (atomically, once the new checkpoint is complete) and the original is gone.", rich_help_panel="Output")]
AllowNonfiniteOpt = Annotated[bool, typer.Option("--allow-nonfinite", help="Go ahead when the checkpoint's parameters hold NaN or Inf (refused by default: matching NaNs would make any comparison pass).", rich_help_panel="Model")]


def _shard_size(value) -> Optional[int]:
    """Parse --max-shard-size while Click parses options, so a bad size is a usage error (exit 2)."""
    if value is None or isinstance(value, int):
        return value
    from ..shards import parse_size

    try:
        return parse_size(value)
    except N2NError as e:
        raise typer.BadParameter(str(e).removeprefix("--max-shard-size: ")) from None


MaxShardSizeOpt = Annotated[
    Optional[int],
    typer.Option(
        "--max-shard-size", parser=_shard_size, metavar="SIZE", show_default=False, rich_help_panel="Output",
        help="Write a sharded checkpoint: -o names a folder of shards of at most SIZE tensor bytes "
        "(500MB, 2GiB, ...) plus model.safetensors.index.json.",
    ),
]


class FormatChoice(str, Enum):
    n2n = "n2n"
    hf = "hf"


FormatOpt = Annotated[
    Optional[FormatChoice],
    typer.Option("--format", help="hf: a Hugging Face folder (config.json, tensors, the input folder's other files); "
                 "n2n: an n2n checkpoint. Default: hf when CKPT is a Hugging Face folder, else n2n.",
                 rich_help_panel="Output", show_default=False),
]
SeqLenOpt = Annotated[Optional[int], typer.Option("--seq-len", min=1, help="Token positions probed in a Hugging Face model (default: the architecture's, 8).", rich_help_panel="Verification", show_default=False)]


# Two checkpoints compared (verify, diff): each may carry its own architecture.
ArchAOpt = Annotated[Optional[str], typer.Option("--arch-a", help="Architecture of A (optional if A carries one).", rich_help_panel="Model")]
ArchBOpt = Annotated[Optional[str], typer.Option("--arch-b", help="Architecture of B (optional if B carries one; else A's is used).", rich_help_panel="Model")]
ArchBothOpt = Annotated[Optional[str], typer.Option("--arch", help="Architecture for both, where --arch-a/--arch-b are not given.", rich_help_panel="Model")]


def load_pair(a: str, b: str, arch_a: Optional[str], arch_b: Optional[str], arch: Optional[str]) -> tuple:
    """Models A and B for a comparison: --arch-a/--arch-b, else --arch, else what each checkpoint
    carries; B without any falls back to A's architecture file."""
    from ..model import load_model

    if a == "-" and b == "-":
        raise N2NError("only one of A and B can be '-' (standard input)")
    arch_a = arch_a or arch
    return load_model(a, arch_a), load_model(b, arch_b or arch, fallback_arch=arch_a)


# ---------------------------------------------------------------------------- error handling


def command(fn):
    """Turn our exceptions into one-line messages and exit codes; no traceback unless --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except VerificationFailed as e:
            if e.result is not None:
                print_verify(e.result)
            fail(e)
        except N2NError as e:
            fail(e)
        except BrokenPipeError:
            # The reader went away (e.g. `| head`); nothing useful left to say.
            try:
                sys.stdout = None  # type: ignore[assignment]
            finally:
                os._exit(1)
        except KeyboardInterrupt:
            say(INTERRUPTED)
            raise typer.Exit(130)
        except Exception as e:  # a bug in this tool: say so plainly
            if state.debug:
                raise
            say(printable(f"internal error: {type(e).__name__}: {e} (run with n2n --debug ... for a traceback, and please report it)"))
            raise typer.Exit(3)

    return wrapper


def fail(e: N2NError):
    if state.debug:
        say(traceback.format_exc().rstrip("\n"))
    say(f"error: {printable(e)}")  # messages quote names from files and argv
    raise typer.Exit(e.exit_code)


def check_new_name(option: str, name: Optional[str]) -> None:
    """A node name the tool will write (``--name``): printable text, or refused (exit 2).

    A name with control characters or undecodable bytes (argv that is not UTF-8 arrives as
    surrogate escapes) could not be shown safely nor written to YAML and safetensors metadata.
    """
    if name is not None and has_unprintable(name):
        raise N2NError(
            f"{option} '{printable(name)}': a new node's name cannot hold control characters or bytes that are "
            "not UTF-8; choose a name of printable characters"
        )


def check_json_target(json_out: bool, output: Optional[str]) -> None:
    if json_out and output == "-":
        raise N2NError("--json and -o - both want standard output; write the checkpoint to a file, or drop --json")


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------- reports


def print_verify(result) -> None:
    table = Table(title="verification", title_justify="left")
    for col in ("output", "shape", "max |Δ|", "max rel", "allowed", "result"):
        table.add_column(col, justify="right" if col.startswith("max") or col == "allowed" else "left")
    for o in result.outputs:
        name = o.name if o.name == o.name_b else f"{o.name} / {o.name_b}"
        table.add_row(
            escape(name),
            str(o.shape),
            f"{o.max_abs:.3g}",
            f"{o.max_rel:.3g}",
            f"{o.bound:.3g}",
            "[green]pass[/]" if o.passed else "[bold red]FAIL[/]",
        )
    inner = getattr(result, "intermediates", None)
    if inner is not None and inner.worst is not None:
        w = inner.worst
        table.add_row(
            escape(f"worst of {inner.compared} inside: {w.name}"),
            str(w.shape),
            f"{w.max_abs:.3g}",
            f"{w.max_rel:.3g}",
            f"{w.bound:.3g}",
            "[green]pass[/]" if w.passed else f"[bold red]FAIL[/] ({inner.failed})",
        )
    console.print(table)
    verdict = "[green]equal[/] within" if result.passed else "[bold red]differ[/] beyond"
    console.print(
        f"{verdict} atol={result.atol:g}, rtol={result.rtol:g} on {result.probes} probes "
        f"(seed {result.seed}, device {escape(result.device)})"
    )


def report_verify_failure(result) -> None:
    """`n2n verify` found a difference: a line saying where, when the table alone does not say
    it plainly (non-finite outputs, a value inside the models)."""
    if result.nonfinite_outputs or all(o.passed for o in result.outputs):
        console.print(escape(result.describe_failure()))


def finish_surgery(teacher, student, report: dict, *, output: Optional[str], verify: bool, probes: int, seed: int,
                   device: str, atol, rtol, json_out: bool, what: str, print_report=None, result=None,
                   max_shard_size: Optional[int] = None, overwrite_input: bool = False,
                   allow_nonfinite: bool = False, noise_free=None, dry_run: bool = False,
                   outputs_only: bool = False, renames: Optional[dict] = None, output_format=None) -> None:
    """Run the safety chain (:func:`n2nsurgery.commit.commit`) on the student, then report.

    A student that fails verification is not written (exit 1). `report` is the surgery's own
    JSON-ready report; `print_report` renders it for humans on stderr. A caller that verified
    already passes its `result`; a widening with noise passes its `noise_free` twin, and the
    noise's deviation joins the report. `dry_run` checks everything and writes nothing; `output`
    may then be None. The other arguments are the options of the same names (see
    :func:`~n2nsurgery.commit.commit`).
    """
    from ..commit import commit

    done = commit(teacher, student, output, verify=verify, probes=probes, seed=seed, device=device, atol=atol,
                  rtol=rtol, outputs_only=outputs_only, noise_free=noise_free, result=result, what=what,
                  dry_run=dry_run, max_shard_size=max_shard_size, overwrite_input=overwrite_input,
                  allow_nonfinite=allow_nonfinite, renames=renames,
                  output_format=getattr(output_format, "value", output_format))
    if done.noise_deviation is not None:
        report["noise_deviation"] = done.noise_deviation
    result = done.verification
    if json_out:
        emit_json({**report, "output": output, "dry_run": dry_run, "verification": result.to_dict() if result else None})
        return
    if print_report is not None:
        print_report(report)
    if result is not None:
        print_verify(result)
    else:
        console.print("[yellow]not verified[/] (--no-verify)")
    print_written(output, dry_run)


def print_written(output: Optional[str], dry_run: bool) -> None:
    """The last line of a surgery's report: what was (or, on a dry run, would have been) written."""
    where = None if output is None else escape(output if output != "-" else "<stdout>")
    if not dry_run:
        console.print(f"wrote {where}")
    elif where is None:
        console.print("dry run: nothing written")
    else:
        console.print(f"dry run: nothing written (would write {where})")


def preflight_surgery(teacher, output: Optional[str], **checks) -> None:
    """The chain's output and finiteness checks, run before the plan so a refusal comes before
    the work (see :func:`n2nsurgery.commit.preflight`)."""
    from ..commit import preflight

    preflight(teacher, output, **checks)


def require_output(output: Optional[str], dry_run: bool) -> None:
    """-o is required unless --dry-run (then it is optional, and checked as for a real run)."""
    if output is None and not dry_run:
        raise N2NError("missing option -o/--output: give the file to write, or --dry-run to check everything and write nothing")
