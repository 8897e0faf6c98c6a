"""YAML files as this tool reads them: UTF-8 text, a strict loader, one-line errors.

Architectures and recipes are both small YAML files a person writes, so both get the same
treatment: a missing or binary file, malformed YAML or a key written twice is an N2NError that
names the file (and the line), never a traceback or a silently collapsed mapping.
"""

from __future__ import annotations

import yaml

from .errors import N2NError
from .inputs import open_input


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error.

    Plain PyYAML keeps the last value silently, so ``{name: a, in: x, in: y}`` would read as
    ``in: y`` and two inputs both called ``x`` would collapse into one.
    """


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
    """The UTF-8 text of `path`; `what` ("an architecture file") names the kind in messages."""
    with open_input(path, what) as f:
        raw = f.read()
    return decode_text(raw, path, what)


def decode_text(raw: bytes, source: str, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise N2NError(f"{source}: not UTF-8 text, so not {what}") from None


def parse_yaml(text: str, source: str):
    """:func:`load_yaml`, with malformed YAML reported as an N2NError naming `source` and the line."""
    try:
        return load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise N2NError(f"{source}: malformed YAML{where}: {problem}") from None
