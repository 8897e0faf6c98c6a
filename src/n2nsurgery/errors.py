"""The two ways a run can fail, and the exit code each one maps to.

Everything the user can cause (a bad file, an unknown layer, a request that cannot be
function-preserving) raises :class:`N2NError`; the CLI prints its message as one line and exits 2.
A surgery whose student does not match its teacher raises :class:`VerificationFailed` (exit 1).
Any other exception is a bug in this tool.
"""

from __future__ import annotations

import re


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


# C0 controls, DEL and C1 controls, which a terminal obeys rather than shows (ESC starts an
# escape sequence that can retitle the window or rewrite the screen), and lone surrogates: an
# undecodable byte of a file name or argument arrives as U+DC80..U+DCFF (PEP 383).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _escape_char(match: "re.Match") -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # the byte it stands for
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text) -> str:
    r"""`text` with every control character and lone surrogate written as a visible escape.

    Names come from files and argv (tensor keys, node names, paths) and may hold anything;
    everything the tool shows passes through here so that none reaches the terminal raw.

    Example:
        >>> printable("conv\x1b]0;title\x07")
        'conv\\x1b]0;title\\x07'
        >>> printable("stud\udcff.safetensors")
        'stud\\xff.safetensors'
    """
    return _UNPRINTABLE.sub(_escape_char, str(text))


def has_unprintable(text: str) -> bool:
    """Whether `text` holds a control character or an undecodable byte (see :func:`printable`)."""
    return _UNPRINTABLE.search(text) is not None
