"""The `n2n` command line: a thin Typer layer over the Python API.

Each command lives in its own module and registers itself on :data:`app` when imported.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__

app = typer.Typer(
    name="n2n",
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
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
):
    from .common import state

    state.configure(debug, quiet)


from . import inspect_cmd, verify_cmd, widen_cmd  # noqa: E402,F401  (each registers its command)
from . import apply_cmd, diff_cmd  # noqa: E402,F401
from . import deepen_cmd  # noqa: E402,F401


def main() -> None:
    app()
