"""Architecture files (docs/format.md): parse, validate, order and write the YAML that wires a model.

An :class:`Architecture` is pure data: inputs, nodes and outputs. It knows nothing about tensors;
:mod:`n2nsurgery.model` binds it to a checkpoint and checks shapes. Everything that can be checked
without tensors is checked here, before anything runs, and every error names the node at fault.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Optional

import yaml

from .errors import N2NError, did_you_mean
from .yamlio import parse_yaml, read_text_file
from .ops import get_op
from .ops.base import REQUIRED, AttrError, REGISTRY

FORMAT = "n2n-arch/1"

FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
INT_DTYPES = ("int64", "int32", "int16", "int8", "uint8")

_INT_MAX = {"int64": 2**63 - 1, "int32": 2**31 - 1, "int16": 2**15 - 1, "int8": 2**7 - 1, "uint8": 2**8 - 1}
# torch.randint takes `high` as an int64, whatever the dtype it draws: int64 probes stop one short.
_HIGH_MAX = {dtype: min(top + 1, 2**63 - 1) for dtype, top in _INT_MAX.items()}
# torch computes shapes, strides and offsets in int64: an integer past it cannot reach torch.
_I64_MAX = 2**63 - 1

# Characters refused in names: C0 and C1 control characters and DEL (they rewrite terminal
# output and log lines) and lone surrogates (the escapes of bytes that are not UTF-8, which no
# file can store as text).
_BAD_NAME_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

_TOP_KEYS = ("format", "name", "inputs", "nodes", "outputs")
_NODE_KEYS = ("name", "op", "in", "params")
_INPUT_KEYS = ("shape", "dtype", "high")


@dataclass
class InputSpec:
    """One model input: the shape of ONE sample, its dtype, and for integer inputs the bound."""

    name: str
    shape: tuple
    dtype: str = "float32"
    high: Optional[int] = None  # integer inputs: probes are drawn from [0, high)

    def to_dict(self) -> dict:
        d = {"shape": list(self.shape), "dtype": self.dtype}
        if self.high is not None:
            d["high"] = self.high
        return d


@dataclass
class Node:
    name: str
    op: str
    inputs: list  # names of nodes or model inputs
    attrs: dict = field(default_factory=dict)  # as written in the YAML (defaults not filled in)
    params: dict = field(default_factory=dict)  # role -> checkpoint key, where not "<name>.<role>"

    def param_key(self, role: str) -> str:
        return self.params.get(role, f"{self.name}.{role}")

    def resolved_attrs(self) -> dict:
        """Attributes with the op's defaults filled in (already validated by parse)."""
        op = get_op(self.op)
        out = {k: a.default for k, a in op.attrs.items()}
        for k, v in self.attrs.items():
            out[k] = op.attrs[k].parse(v)
        return out

    def to_dict(self) -> dict:
        d = {"name": self.name, "op": self.op, "in": self.inputs[0] if len(self.inputs) == 1 else list(self.inputs)}
        d.update(self.attrs)
        if self.params:
            d["params"] = dict(self.params)
        return d


@dataclass
class Architecture:
    inputs: dict  # name -> InputSpec, in file order
    nodes: list  # Node, in topological order
    outputs: list  # node names
    name: Optional[str] = None
    source: str = "<architecture>"  # file name for messages

    # ---------------------------------------------------------------- lookups

    def node(self, name: str) -> Node:
        found = self._find(name)
        if found is not None:
            return found
        raise N2NError(f"{self.source}: no node named {name!r}{did_you_mean(name, self.node_names())}")

    def has_node(self, name: str) -> bool:
        return self._find(name) is not None

    def _find(self, name: str) -> Optional[Node]:
        """The node named `name`, in O(1) for a hit: a name -> position index, rebuilt when the
        node list changed length or identity. `nodes` is plain data that surgery edits in place,
        so a hit is confirmed against the list and a miss falls back to a scan."""
        stamp = (id(self.nodes), len(self.nodes))
        index = self.__dict__.get("_index")
        if index is None or index[0] != stamp:
            index = (stamp, {n.name: i for i, n in enumerate(self.nodes)})
            self.__dict__["_index"] = index
        i = index[1].get(name)
        if i is not None and self.nodes[i].name == name:
            return self.nodes[i]
        return next((n for n in self.nodes if n.name == name), None)

    def node_names(self) -> list:
        return [n.name for n in self.nodes]

    def consumers(self, value: str) -> list:
        """Nodes that read `value` (a node or input name), in order, each once."""
        return [n for n in self.nodes if value in n.inputs]

    def copy(self) -> "Architecture":
        """A copy whose nodes, inputs and outputs can be edited without touching this one.

        Node by node rather than one deepcopy of everything (which costs seconds at 100k
        nodes): names, ops and scalars are immutable; only attribute values that are lists or
        mappings are deep-copied."""
        return dataclasses.replace(
            self,
            inputs={k: dataclasses.replace(v) for k, v in self.inputs.items()},
            nodes=[_copy_node(n) for n in self.nodes],
            outputs=list(self.outputs),
        )

    # ---------------------------------------------------------------- YAML

    def to_yaml(self) -> str:
        """The canonical YAML text: block style at the top, one flow mapping per node."""
        lines = [f"format: {FORMAT}"]
        if self.name is not None:
            lines.append("name: " + _flow(self.name))
        lines.append("inputs:")
        for spec in self.inputs.values():
            lines.append(f"  {_flow(spec.name)}: {_flow(spec.to_dict())}")
        lines.append("nodes:")
        for n in self.nodes:
            lines.append(f"  - {_flow(n.to_dict())}")
        lines.append("outputs: " + _flow(list(self.outputs)))
        return "\n".join(lines) + "\n"


def _copy_node(n: Node) -> Node:
    attrs = {k: (copy.deepcopy(v) if isinstance(v, (list, dict)) else v) for k, v in n.attrs.items()} if n.attrs else {}
    return Node(n.name, n.op, list(n.inputs), attrs, dict(n.params) if n.params else {})


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 30).strip().removesuffix("\n...")


# -------------------------------------------------------------------- parsing


def load_architecture(path: str) -> Architecture:
    """Read and validate an architecture YAML file."""
    return parse_architecture(read_text_file(path, "an architecture YAML file"), source=path)


def parse_architecture(text: str, source: str = "<architecture>") -> Architecture:
    """Parse and validate architecture YAML text. Raises N2NError naming `source` and the node."""
    doc = parse_yaml(text, source)
    if not isinstance(doc, dict):
        raise N2NError(f"{source}: an architecture must be a YAML mapping with format, inputs, nodes and outputs")

    def fail(msg):
        raise N2NError(f"{source}: {msg}")

    for k in doc:
        if k not in _TOP_KEYS:
            fail(f"unknown top-level key {k!r}{did_you_mean(str(k), _TOP_KEYS)}")
    if doc.get("format") != FORMAT:
        fail(f"format must be {FORMAT!r}, got {doc.get('format')!r}")
    name = doc.get("name")
    if name is not None and not isinstance(name, str):
        fail("name must be a string")
    if name is not None:
        _check_name_chars(name, "the architecture's name", fail)

    inputs = _parse_inputs(doc.get("inputs"), fail)
    nodes = _parse_nodes(doc.get("nodes"), fail)
    outputs = doc.get("outputs")
    if isinstance(outputs, str):
        outputs = [outputs]
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
        fail("outputs must be a non-empty list of node names")
    if len(set(outputs)) != len(outputs):
        fail("outputs lists the same node twice")

    arch = Architecture(inputs=inputs, nodes=nodes, outputs=list(outputs), name=name, source=source)
    _check_graph(arch, fail)
    return arch


def _parse_inputs(raw, fail) -> dict:
    if not isinstance(raw, dict) or not raw:
        fail("inputs must be a mapping of input name to {shape, dtype}")
    out = {}
    for name, spec in raw.items():
        if not isinstance(name, str):
            fail(f"input name {name!r} must be a string")
        _check_name_chars(name, "input name", fail)
        if not isinstance(spec, dict):
            fail(f"input {name!r} must be a mapping with shape and dtype")
        for k in spec:
            if k not in _INPUT_KEYS:
                fail(f"input {name!r}: unknown key {k!r}{did_you_mean(str(k), _INPUT_KEYS)}")
        shape = spec.get("shape")
        if (
            not isinstance(shape, list)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
        ):
            fail(f"input {name!r}: shape must be a list of positive integers (one sample, no batch dim), got {shape!r}")
        # (a shape too large to run is refused by verification's memory check, naming the figure)
        dtype = spec.get("dtype", "float32")
        if dtype not in FLOAT_DTYPES + INT_DTYPES:
            fail(f"input {name!r}: dtype must be one of {', '.join(FLOAT_DTYPES + INT_DTYPES)}, got {dtype!r}")
        high = spec.get("high")
        if dtype in INT_DTYPES:
            if not isinstance(high, int) or isinstance(high, bool) or high < 1:
                fail(f"input {name!r}: an integer input needs high: a positive integer (probes are drawn from [0, high))")
            top = _HIGH_MAX[dtype]
            if high > top:
                fail(f"input {name!r}: high {high} does not fit {dtype} (probes are drawn from [0, high)); use at most {top}")
        elif high is not None:
            fail(f"input {name!r}: high applies to integer inputs only")
        out[name] = InputSpec(name=name, shape=tuple(shape), dtype=dtype, high=high)
    return out


def _parse_nodes(raw, fail) -> list:
    if not isinstance(raw, list) or not raw:
        fail("nodes must be a non-empty list")
    nodes = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            fail(f"nodes[{i}] must be a mapping with name, op and in")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            fail(f"nodes[{i}] has no name (a non-empty string)")
        _check_name_chars(name, f"nodes[{i}] name", fail)
        where = f"node {name!r}"
        opname = item.get("op")
        if not isinstance(opname, str):
            fail(f"{where}: op must be a string")
        op = get_op(opname)
        if op is None:
            fail(f"{where}: unknown op {opname!r}{did_you_mean(opname, REGISTRY)}")
        ins = item.get("in")
        if isinstance(ins, str):
            ins = [ins]
        if not isinstance(ins, list) or not ins or not all(isinstance(x, str) for x in ins):
            fail(f"{where}: in must be an input or node name, or a list of them")
        if op.arity == -1 and len(ins) < 2:
            fail(f"{where}: {opname} takes two or more inputs, got {len(ins)}")
        if op.arity != -1 and len(ins) != op.arity:
            fail(f"{where}: {opname} takes {op.arity} input{'s' if op.arity > 1 else ''}, got {len(ins)}")
        params = item.get("params", {})
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            fail(f"{where}: params must map roles to checkpoint keys (strings)")
        for role in params:
            if role not in op.params:
                known = ", ".join(op.params) or "none"
                fail(f"{where}: {opname} has no parameter role {role!r} (roles: {known})")
        attrs = {}
        for k, v in item.items():
            if k in _NODE_KEYS:
                continue
            if k not in op.attrs:
                known = ", ".join(op.attrs) or "none"
                fail(f"{where}: unknown attribute {k!r} for {opname}{did_you_mean(str(k), op.attrs)} (attributes: {known})")
            try:
                op.attrs[k].parse(v)
            except AttrError as e:
                fail(f"{where}: attribute {k} {e}")
            too_big = _int_beyond_int64(v)
            if too_big is not None:
                fail(f"{where}: attribute {k} holds {too_big}, beyond what torch can take (|value| <= {_I64_MAX})")
            attrs[k] = v
        for k, a in op.attrs.items():
            if a.default is REQUIRED and k not in attrs:
                fail(f"{where}: {opname} needs attribute {k!r}")
        nodes.append(Node(name=name, op=opname, inputs=list(ins), attrs=attrs, params=dict(params)))
    return nodes


def _check_name_chars(name: str, what: str, fail) -> None:
    """Refuse a name holding a control character or a lone surrogate, saying where (0-based)."""
    bad = _BAD_NAME_CHAR.search(name)
    if bad is None:
        return
    char = bad.group()
    kind = "a lone surrogate (not valid UTF-8)" if "\ud800" <= char <= "\udfff" else "a control character"
    fail(f"{what} {name!r} holds {kind}, U+{ord(char):04X}, at position {bad.start()}; names must be printable text")


def _int_beyond_int64(value):
    """The first integer in an attribute value (an int, or ints nested in lists/mappings) outside int64."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, int) and not isinstance(item, bool) and not -_I64_MAX - 1 <= item <= _I64_MAX:
            return item
    return None


def _check_graph(arch: Architecture, fail) -> None:
    """Duplicate names, dangling inputs, unknown outputs, cycles; then sort topologically."""
    seen = set(arch.inputs)
    for n in arch.nodes:
        if n.name in seen:
            what = "a model input" if n.name in arch.inputs else "another node"
            fail(f"duplicate name {n.name!r}: a node has the same name as {what}")
        seen.add(n.name)
    for n in arch.nodes:
        for src in n.inputs:
            if src not in seen:
                fail(f"node {n.name!r}: input {src!r} is not a model input or node{did_you_mean(src, seen)}")
    for o in arch.outputs:
        if o not in seen or o in arch.inputs:
            fail(f"output {o!r} is not a node{did_you_mean(o, [n.name for n in arch.nodes])}")

    # Kahn's algorithm, stable: among ready nodes, the one written first goes first.
    import heapq

    by_name = {n.name: n for n in arch.nodes}
    position = {n.name: i for i, n in enumerate(arch.nodes)}
    readers = {n.name: [] for n in arch.nodes}
    indeg = {}
    for n in arch.nodes:
        srcs = [s for s in n.inputs if s in by_name]
        indeg[n.name] = len(srcs)
        for s in srcs:
            readers[s].append(n.name)
    ready = [position[name] for name, d in indeg.items() if d == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        cur = arch.nodes[heapq.heappop(ready)]
        order.append(cur)
        for m in readers[cur.name]:
            indeg[m] -= 1
            if indeg[m] == 0:
                heapq.heappush(ready, position[m])
    if len(order) != len(arch.nodes):
        stuck = [n.name for n in arch.nodes if indeg[n.name] > 0]
        fail(f"the graph has a cycle through node {stuck[0]!r} (nodes on or after it: {', '.join(stuck)})")
    arch.nodes = order
