"""The `n2n` command group: how usage errors look, and the global flags every command accepts.

Click (vendored in Typer) prints a usage error as a framed, multi-line box; the tool promises one
line, ``error: ...``, on stderr with exit 2. :class:`N2NGroup` runs Click in non-standalone mode
and formats what it raises itself, so the console script and ``CliRunner(app)`` in tests see the
same thing.
"""

from __future__ import annotations

import copy
import errno
import os
import sys

from typer import Abort, Exit, _click
from typer.core import TyperGroup

from ..errors import printable

#: the root options that mean the same after a subcommand (``n2n widen ... -q``)
GLOBAL_FLAGS = ("debug", "quiet")

INTERRUPTED = "interrupted; nothing was written"


def say(line: str) -> None:
    """Write one line to stderr. A closed or broken stderr loses the line, never the exit code."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):  # None (started with 2>&-), closed, or full
        pass


def usage_line(e: _click.ClickException) -> str:
    """A Click error as the tool's one line: ``error: <what>; see 'n2n CMD --help'``."""
    line = f"error: {e.format_message()}"
    ctx = getattr(e, "ctx", None)
    if ctx is not None and ctx.command.get_help_option(ctx) is not None:
        line = f"{line.rstrip('.')}; see '{ctx.command_path} --help'"
    return printable(line)


def _set_late_flag(ctx, param, value):
    """`--debug` or `--quiet` given after the subcommand: the same as before it."""
    from .common import state

    if value:
        state.configure(state.debug or param.name == "debug", state.quiet or param.name == "quiet")
    return value


def _late_copy(param: _click.Parameter) -> _click.Parameter:
    late = copy.copy(param)
    late.expose_value = False  # the command function does not take it; the callback sets state
    late.callback = _set_late_flag
    return late


class N2NGroup(TyperGroup):
    def __init__(self, **attrs):
        super().__init__(**attrs)
        flags = [_late_copy(p) for p in self.params if p.name in GLOBAL_FLAGS]
        for cmd in self.commands.values():
            cmd.params.extend(flags)

    def invoke(self, ctx):
        """Ctrl-C while Click parses a command's options: one line, as in the command itself
        (Typer would exit 130 silently)."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            say(INTERRUPTED)
            raise Exit(130) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Run a command; usage errors are one line on stderr (exit 2), Ctrl-C one line (130)."""
        _plain_help_without_color()
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0  # (n2n's commands return None; Exit returns its code)
        except _click.exceptions.NoArgsIsHelpError:
            code = 2  # bare `n2n`: the help was printed on stdout while raising
        except _click.ClickException as e:
            say(usage_line(e))
            code = e.exit_code
        except Abort:  # Ctrl-C or end of input while Click was parsing
            say(INTERRUPTED)
            code = 130
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise
            code = 1  # the reader of --help went away (`n2n --help | head -1`)
        if not standalone_mode:
            return code
        sys.exit(code)


def _plain_help_without_color() -> None:
    """NO_COLOR (any non-empty value, no-color.org): help text without any escape sequence.

    Rich alone drops only colours under NO_COLOR and keeps bold and italic.
    """
    if os.environ.get("NO_COLOR"):
        from typer import rich_utils

        rich_utils.COLOR_SYSTEM = None
