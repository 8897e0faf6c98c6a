"""YAML files as this tool reads them: UTF-8 text, a strict loader, one-line errors.

Architectures and recipes are both small YAML files a person writes, so both get the same
treatment: a missing or binary file, malformed YAML or a key written twice is an N2NError that
names the file (and the line), never a traceback or a silently collapsed mapping.

Architectures also arrive inside checkpoints downloaded from model hubs (the ``n2n.arch``
metadata), so the loader is also bounded against hostile text: no aliases (a "billion laughs"
document expands a few hundred bytes into gigabytes), no nesting deeper than :data:`MAX_DEPTH`
(PyYAML's composer recurses once per level), at most :data:`MAX_YAML_BYTES` of text (a path
can name /dev/zero), and a value PyYAML cannot build (a 5,000-digit integer, a date that does
not exist) is malformed YAML at its line, not a crash.
"""

from __future__ import annotations

import yaml

from .errors import N2NError
from .inputs import open_input, read_limited

MAX_YAML_BYTES = 16 * 1024 * 1024  # far more than any architecture or recipe a person writes
MAX_DEPTH = 64  # an architecture nests 4 levels; a recipe 4
MAX_INT_DIGITS = 24  # 2**64 has 20 digits; see jsonio


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error, and
    aliases, deep nesting and values that Python cannot build are refused.

    Plain PyYAML keeps the last value silently, so ``{name: a, in: x, in: y}`` would read as
    ``in: y`` and two inputs both called ``x`` would collapse into one.
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"aliases (*{event.anchor}) are not accepted; write the value out in full", event.start_mark
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as e:  # e.g. int() of 5,000 digits, date 2024-13-45
            raise yaml.constructor.ConstructorError(None, None, f"cannot read value {_clip(node)}: {e}", node.start_mark) from None

    def construct_yaml_int(self, node):
        digits = len(str(node.value).lstrip("+-").removeprefix("0x").removeprefix("0b"))  # hex and binary too
        if digits > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {digits} digits (at most {MAX_INT_DIGITS} are accepted)", node.start_mark
            )
        return super().construct_yaml_int(node)


def _clip(node) -> str:
    text = str(getattr(node, "value", ""))
    return repr(text if len(text) <= 40 else text[:40] + "...")


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def _construct_unique_mapping(loader, node, deep=False):
    first_line = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; not a duplicate
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            seen = key in first_line
        except TypeError:  # an unhashable key: construct_mapping reports it below
            continue
        if seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is written twice in one mapping (first on line {first_line[key] + 1})", key_node.start_mark
            )
        first_line[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml(text: str):
    """Parse YAML text safely, refusing duplicate keys (which PyYAML would silently collapse).

    Args:
        text: the YAML document.

    Returns:
        The parsed document (dicts, lists, scalars).

    Raises:
        yaml.YAMLError: malformed YAML, or a key written twice in one mapping.

    Example:
        >>> load_yaml("steps: [1, 2]")
        {'steps': [1, 2]}
    """
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def read_text_file(path: str, what: str) -> str:
    """The UTF-8 text of `path`; `what` ("an architecture file") names the kind in messages.

    At most :data:`MAX_YAML_BYTES` are read: a longer file (or a device without end) is refused.
    """
    with open_input(path, what) as f:
        raw = read_limited(f, MAX_YAML_BYTES, path, what)
    if not raw:
        raise N2NError(f"{path}: is empty, not {what}")
    return decode_text(raw, path, what)


def decode_text(raw: bytes, source: str, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise N2NError(f"{source}: not UTF-8 text, so not {what}") from None


def parse_yaml(text: str, source: str):
    """:func:`load_yaml`, with malformed YAML reported as an N2NError naming `source` and the line."""
    if len(text) > MAX_YAML_BYTES:  # text from a checkpoint's metadata, not read by read_text_file
        raise N2NError(f"{source}: larger than {MAX_YAML_BYTES // (1024 * 1024)} MiB, too large for YAML this tool reads")
    try:
        return load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise N2NError(f"{source}: malformed YAML{where}: {problem}") from None
