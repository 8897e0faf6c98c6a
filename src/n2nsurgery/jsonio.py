"""JSON as this tool reads it from files it did not write: strict, bounded, one-line errors.

Three places read JSON that came from elsewhere (a model hub, a pipe): the safetensors header,
a sharded checkpoint's index and the ``n2n.history`` metadata. Python's ``json`` module is too
trusting for them:

* a key written twice keeps the last value silently, so two readers (ours and another
  library) could see different tensors under one name;
* nesting a few thousand levels deep raises RecursionError (a crash, not a message);
* an integer of thousands of digits raises ValueError from Python's int-size limit, or, where
  that limit is switched off, takes time quadratic in its length.

:func:`parse_json` refuses all three with :class:`JSONRefused`, whose message the caller prefixes
with the file it read.
"""

from __future__ import annotations

import contextlib
import gc
import json

# Deeper than this is no header, index or history this tool writes (they nest 3 to 5 levels).
MAX_DEPTH = 64
# Digits of the longest integer accepted: 2**64 has 20. Longer ones are no offset, shape or count.
MAX_INT_DIGITS = 24


class JSONRefused(ValueError):
    """Malformed or hostile JSON. The message says what is wrong, without naming the file."""


def parse_json(text, max_depth: int | None = MAX_DEPTH):
    """Parse JSON `text` (str or UTF-8 bytes), refusing duplicate keys, deep nesting, long integers.

    Args:
        text: the JSON document.
        max_depth: the deepest nesting of arrays and objects accepted; None skips the walk that
            checks it (for a document whose schema the caller validates anyway; the parser's own
            recursion limit is still turned into a refusal).

    Returns:
        The parsed value.

    Raises:
        JSONRefused: invalid JSON, a key written twice in one object, nesting deeper than
            `max_depth`, or an integer longer than :data:`MAX_INT_DIGITS` digits.

    Example:
        >>> parse_json('{"a": 1, "a": 2}')
        Traceback (most recent call last):
        n2nsurgery.jsonio.JSONRefused: key 'a' is written twice in one object
    """
    try:
        with gc_paused():
            value = json.loads(text, object_pairs_hook=_unique_keys, parse_int=_bounded_int)
    except json.JSONDecodeError as e:
        raise JSONRefused(f"invalid JSON: {e}") from None
    except RecursionError:
        raise JSONRefused(f"nested deeper than {max_depth or MAX_DEPTH} levels") from None
    except UnicodeDecodeError:
        raise JSONRefused("not UTF-8 text") from None
    if max_depth is not None and _depth_exceeds(value, max_depth):
        raise JSONRefused(f"nested deeper than {max_depth} levels")
    return value


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cycle collector for a block that builds many acyclic objects.

    Parsing a header of a million entries creates millions of dicts and lists; the collector,
    triggered every few hundred allocations, walks all of them again each time, which triples
    the parsing time. Nothing built here can form a cycle, so nothing is lost by waiting.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _unique_keys(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # rare: only then find which key repeats
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise JSONRefused(f"key {key[:80]!r} is written twice in one object")
            seen.add(key)
    return obj


def _bounded_int(digits: str) -> int:
    # Checked before int() converts: Python's own limit raises a bare ValueError, and where it
    # is switched off (PYTHONINTMAXSTRDIGITS=0) conversion time grows with the square of the length.
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise JSONRefused(f"an integer of {len(digits)} digits (at most {MAX_INT_DIGITS} are accepted)")
    return int(digits)


def _depth_exceeds(value, limit: int) -> bool:
    """Whether arrays/objects nest deeper than `limit`; iterative, so depth cannot overflow the stack."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False
