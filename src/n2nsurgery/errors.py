"""The two ways a run can fail, and the exit code each one maps to.

Everything the user can cause (a bad file, an unknown layer, a request that cannot be
function-preserving) raises :class:`N2NError`; the CLI prints its message as one line and exits 2.
A surgery whose student does not match its teacher raises :class:`VerificationFailed` (exit 1).
Any other exception is a bug in this tool.
"""

from __future__ import annotations


class N2NError(Exception):
    """Bad input or a request that cannot be honoured exactly. Exit code 2.

    The message is one sentence that names the file, node or key at fault and, where there is
    one, says what would work instead.
    """

    exit_code = 2


class VerificationFailed(N2NError):
    """The models differ beyond tolerance. Exit code 1.

    ``result`` holds the :class:`~n2nsurgery.verify.VerifyResult` that failed, so callers can
    report the per-output errors.
    """

    exit_code = 1

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


def did_you_mean(word: str, choices) -> str:
    """A ' (did you mean X?)' suffix naming the closest choices, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
