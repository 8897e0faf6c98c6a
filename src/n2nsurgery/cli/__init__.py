"""The `n2n` command line: a thin Typer layer over the Python API.

Each command lives in its own module and registers itself on :data:`app` when imported.
Nothing here imports torch: `n2n --help`, `n2n --version` and usage errors start in a tenth of a
second; a command imports what it needs when it runs.
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted() -> None:
    """Ctrl-C outside any command's own handler (while Python imports the CLI, say): the same
    one line as in a command (:data:`.group.INTERRUPTED`, not importable yet), exit 130."""
    try:
        sys.stderr.write("interrupted; nothing was written\n")
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass
    os._exit(130)


try:
    import ctypes
    from typing import Annotated

    import typer

    from .. import __version__
    from .group import N2NGroup
except KeyboardInterrupt:
    _interrupted()

app = typer.Typer(
    name="n2n",
    cls=N2NGroup,
    help="Grow trained networks wider or deeper without changing what they compute (Net2Net).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        print(f"n2n {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show a traceback with errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on stderr but errors: no progress bars, no reports.")] = False,
    version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
):
    from .common import state

    state.configure(debug, quiet)


try:
    from . import inspect_cmd, verify_cmd, widen_cmd  # noqa: E402,F401  (each registers its command)
    from . import apply_cmd, diff_cmd  # noqa: E402,F401
    from . import deepen_cmd  # noqa: E402,F401
    from . import grow_cmd  # noqa: E402,F401
    from . import import_cmd  # noqa: E402,F401
except KeyboardInterrupt:
    _interrupted()


def _return_freed_memory() -> None:
    """Have glibc give every large freed block back to the system at once.

    By default glibc raises its mmap threshold each time a large block is freed (up to 32 MiB),
    after which blocks of that size come from its heap, which it rarely shrinks; a pass over
    many tensors (a verification, a finiteness check) then ratchets memory far past the one
    tensor alive at a time. A fixed 1 MiB threshold maps each large tensor on its own and
    unmaps it when freed. Elsewhere (macOS, musl) this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a CI cancel), raised in the main thread like Ctrl-C, so a
    write in progress removes its temporary file; the process then exits 143 (128 + 15)."""


_terminated = []  # non-empty once SIGTERM arrived


def _raise_on_sigterm() -> None:
    """Turn SIGTERM into :class:`Terminated`, unless whoever started us chose to ignore it."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
        _terminated.append(signum)
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    """The ``n2n`` console script: run the command, then leave without interpreter teardown."""
    _return_freed_memory()
    _fill_closed_stderr()
    _raise_on_sigterm()
    try:
        try:
            app()
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # done or cleaned up: exit as planned
    except Terminated:  # arrived outside a command (at start-up, or as it returned)
        code = 143
    except KeyboardInterrupt:  # between Click's own handlers (rare, but never a traceback)
        _interrupted()
    _exit_now(143 if _terminated else code)


def _fill_closed_stderr() -> None:
    """Started with stderr closed (``2>&-``): put /dev/null on descriptor 2.

    Otherwise the next file opened (the output checkpoint) would get descriptor 2, and anything
    written to it at the C level (a warning from a library) would land inside the checkpoint.
    Python has already set ``sys.stderr`` to None, which our writes tolerate.
    """
    try:
        os.fstat(2)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY)
        if fd != 2:
            os.dup2(fd, 2)
            os.close(fd)


def _exit_now(code) -> None:
    """Exit with `code` (as ``SystemExit`` reads it) without tearing the interpreter down.

    With torch loaded, Python's teardown (freeing every module and its objects) takes 0.3-0.5 s
    here, about a third of a 1 GiB widening. By now there is nothing left to finish: outputs are
    closed and renamed into place, temporary files removed by the commands' own clean-up. Only
    the standard streams may hold buffered text, so flush them and go.
    """
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): print it, exit 1, as Python does
        sys.stderr.write(f"{code}\n")
        code = 1
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except (BrokenPipeError, ValueError, OSError):  # the reader went away, or it was closed
        code = code or 1
    try:  # stderr carries only messages: losing them must not change the exit code
        if sys.stderr is not None:
            sys.stderr.flush()
    except (ValueError, OSError):
        pass
    os._exit(code)
