"""A model: an architecture bound to the tensors of a checkpoint, shape-checked before use.

:func:`load_model` is the front door: it opens a checkpoint lazily, takes the architecture from
``--arch`` or from the checkpoint's own ``n2n.arch`` metadata, and checks every node's parameters
and shapes. Surgery never mutates a model; it returns a new one whose :class:`TensorStore` lays
the changed tensors over the untouched checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

import torch

from .arch import Architecture, load_architecture, parse_architecture
from .checkpoint import Checkpoint, LazyTensor, write_checkpoint
from .errors import N2NError
from .jsonio import JSONRefused, parse_json
from .ops import get_op
from .ops.base import ShapeError
from .shards import write_sharded
from .storage import open_any

META_FORMAT = "format"
META_ARCH = "n2n.arch"
META_HISTORY = "n2n.history"


class TensorStore:
    """The tensors of a model: a base checkpoint, with some tensors replaced, added or dropped.

    Reads go to the replacements first and to the (lazily read) checkpoint otherwise, so a
    surgery that changes three tensors of a large checkpoint holds only those three in memory.
    """

    def __init__(self, base: Optional[Checkpoint] = None, changes: Optional[Mapping] = None, dropped: Iterable = ()):
        self.base = base
        self.changes: dict = dict(changes or {})
        self.dropped = frozenset(dropped)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> "TensorStore":
        return cls(None, {k: v.detach() for k, v in tensors.items()})

    def keys(self) -> list:
        out = [k for k in (self.base.keys() if self.base else []) if k not in self.dropped and k not in self.changes]
        return out + list(self.changes)

    def __contains__(self, key) -> bool:
        return key in self.changes or (self.base is not None and key in self.base and key not in self.dropped)

    def __len__(self) -> int:
        return len(self.keys())

    def get(self, key: str) -> torch.Tensor:
        if key in self.changes:
            value = self.changes[key]
            # A change may be a LazyTensor, computed when read (the writer computes it once, while
            # writing, so a surgery holds no more than one changed tensor at a time).
            return value.tensor() if isinstance(value, LazyTensor) else value
        if self.base is not None and key in self.base and key not in self.dropped:
            return self.base.get(key)
        raise KeyError(key)

    def mapped(self, key: str):
        """Context manager: `key` for a pass that only reads it (see :meth:`Checkpoint.mapped`)."""
        if key in self.changes or self.base is None or key in self.dropped:
            return contextlib.nullcontext(self.get(key))
        return self.base.mapped(key)

    def shape(self, key: str) -> tuple:
        if key in self.changes:
            return tuple(self.changes[key].shape)
        return self.base.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        if key in self.changes:
            return self.changes[key].dtype
        return self.base.dtype(key)

    def with_changes(self, changes: Mapping[str, torch.Tensor], dropped: Iterable = ()) -> "TensorStore":
        """A new store with `changes` laid over this one (and `dropped` keys removed)."""
        merged = dict(self.changes)
        merged.update(changes)
        gone = set(self.dropped) | set(dropped)
        for k in dropped:
            merged.pop(k, None)
        return TensorStore(self.base, merged, gone - set(changes))

    def sources(self) -> dict:
        """What the writer needs: changed tensors as tensors, untouched ones as raw byte ranges."""
        out = {}
        for k in self.keys():
            if k in self.changes:
                out[k] = self.changes[k]
            else:  # untouched: the writer copies its bytes straight from the input file
                out[k] = LazyTensor(self.base.dtype(k), self.base.shape(k), (lambda k=k: self.base.raw(k)), self.base.span(k))
        return out

    def to_dict(self) -> dict:
        return {k: self.get(k) for k in self.keys()}


@dataclass
class Model:
    """An architecture, its tensors, and what the checkpoint says about where it came from."""

    arch: Architecture
    tensors: TensorStore
    history: list = field(default_factory=list)  # n2n.history: one dict per surgery step
    metadata: dict = field(default_factory=dict)  # other metadata keys, carried through unchanged
    source: str = "<model>"
    shapes: dict = field(default_factory=dict)  # value name -> one-sample shape, filled by check()
    hf: Optional[object] = None  # read from a Hugging Face folder: its HFOrigin (written back as one)

    def check(self) -> "Model":
        """Validate parameters and shapes of every node; fills :attr:`shapes`. Returns self."""
        _refuse_empty_parameters(self.arch, self.tensors, self.source)
        self.shapes = infer_shapes(self.arch, self.tensors, self.source)
        return self

    def param(self, node, role: str) -> Optional[torch.Tensor]:
        key = node.param_key(role)
        return self.tensors.get(key) if key in self.tensors else None

    def param_shape(self, node, role: str) -> Optional[tuple]:
        key = node.param_key(role)
        return self.tensors.shape(key) if key in self.tensors else None

    def replace(self, arch: Optional[Architecture] = None, tensors: Optional[TensorStore] = None, step: Optional[dict] = None,
                known_shapes: Optional[Mapping] = None) -> "Model":
        """A new, checked model with a new architecture and/or tensors, and `step` appended to history.

        `known_shapes`: nodes whose parameters and output shapes the caller guarantees unchanged
        (deepen: every old node), taken as they are instead of checked again; new nodes are checked.
        """
        m = Model(
            arch=arch if arch is not None else self.arch,
            tensors=tensors if tensors is not None else self.tensors,
            history=self.history + ([step] if step else []),
            metadata=dict(self.metadata),
            source=self.source,
            hf=self.hf,
        )
        if known_shapes is None:
            return m.check()
        m.shapes = infer_shapes(m.arch, m.tensors, m.source, known=known_shapes)
        return m

    def float_dtypes(self) -> set:
        """The floating dtypes of all parameters the graph uses."""
        out = set()
        for node in self.arch.nodes:
            for role in get_op(node.op).params:
                key = node.param_key(role)
                if key in self.tensors and self.tensors.dtype(key).is_floating_point:
                    out.add(self.tensors.dtype(key))
        return out

    def parameter_count(self) -> int:
        """Numbers in the floating tensors the graph uses (tied tensors once; counters such as
        batchnorm's num_batches_tracked are not parameters)."""
        import math

        def count() -> int:
            keys = {node.param_key(r) for node in self.arch.nodes for r in get_op(node.op).params}
            return sum(
                math.prod(self.tensors.shape(k)) for k in keys if k in self.tensors and self.tensors.dtype(k).is_floating_point
            )

        # Reports ask it of each model twice or more (a long recipe: as the student of one step
        # and the teacher of the next).
        return self.memo("parameter_count", count)

    # Facts derived from the whole graph, cached while the architecture and store objects (and
    # their sizes) are the same ones, so a long recipe does not recompute them at every step.
    def _stamp(self) -> tuple:
        return (id(self.arch), id(self.arch.nodes), len(self.arch.nodes), id(self.tensors), len(self.tensors.changes))

    def memo(self, name: str, compute):
        """`compute()`, cached under `name` for this model as it is now."""
        hit = self.__dict__.get("_memo_" + name)
        if hit is not None and hit[0] == self._stamp():
            return hit[1]
        value = compute()
        self.remember(name, value)
        return value

    def remember(self, name: str, value) -> None:
        """Record a derived fact the caller computed more cheaply (a surgery knows what it added)."""
        self.__dict__["_memo_" + name] = (self._stamp(), value)


def _refuse_empty_parameters(arch: Architecture, tensors: TensorStore, source: str) -> None:
    """Refuse a parameter with a dimension of size 0: a layer without units computes nothing,
    and no unit can be copied to widen it (the checkpoint is truncated or pruned to nothing)."""
    for node in arch.nodes:
        for role in get_op(node.op).params:
            key = node.param_key(role)
            if key in tensors and 0 in tensors.shape(key):
                shape = list(tensors.shape(key))
                raise N2NError(
                    f"{source}: node {node.name!r}: parameter {key!r} has shape {shape}, with no units along dim "
                    f"{shape.index(0)}; every layer needs at least one unit (was the checkpoint pruned or cut short?)"
                )


class GraphIndex:
    """Lookups the graph walks need, built once per architecture (not once per walk).

    ``by_name``: node name -> node. ``readers``: value -> [(node, input index)] in node order.
    ``key_users``: checkpoint key -> [(node, role)] of every node whose parameter is that key
    (two or more: a tied tensor).
    """

    def __init__(self, arch: Architecture):
        self.by_name = {n.name: n for n in arch.nodes}
        self.readers: dict = {}
        self.key_users: dict = {}
        for n in arch.nodes:
            for i, src in enumerate(n.inputs):
                self.readers.setdefault(src, []).append((n, i))
            for role in get_op(n.op).params:
                self.key_users.setdefault(n.param_key(role), []).append((n, role))


def graph_index(model: "Model") -> GraphIndex:
    """The model's :class:`GraphIndex`, cached while its architecture object and node count stay
    the same (surgery builds new models; an index of a changed graph is rebuilt)."""
    stamp = (id(model.arch), id(model.arch.nodes), len(model.arch.nodes))
    cached = model.__dict__.get("_graph_index")
    if cached is None or cached[0] != stamp:
        cached = (stamp, GraphIndex(model.arch))
        model.__dict__["_graph_index"] = cached
    return cached[1]


def infer_shapes(arch: Architecture, tensors: TensorStore, source: str = "<model>", known: Optional[Mapping] = None) -> dict:
    """One-sample output shape of every node; rejects missing or wrongly shaped parameters.

    Nodes named in `known` take the shape given there unchecked (see :meth:`Model.replace`)."""
    shapes = {name: tuple(spec.shape) for name, spec in arch.inputs.items()}
    for node in arch.nodes:
        if known is not None and node.name in known:
            shapes[node.name] = known[node.name]
            continue
        op = get_op(node.op)
        pshapes = {}
        for role, spec in op.params.items():
            key = node.param_key(role)
            if key in tensors:
                pshapes[role] = tuple(tensors.shape(key))
                dt = tensors.dtype(key)
                if role != "num_batches_tracked" and not dt.is_floating_point:
                    raise N2NError(f"{source}: node {node.name!r}: parameter {key!r} has dtype {dt}, expected a floating dtype")
            elif spec.optional:
                pshapes[role] = None
            else:
                raise N2NError(
                    f"{source}: node {node.name!r} ({node.op}) needs parameter {key!r}, which the checkpoint does not have"
                    + _similar_keys(key, tensors)
                )
        try:
            shapes[node.name] = tuple(op.infer_shape([shapes[i] for i in node.inputs], pshapes, node.resolved_attrs()))
        except ShapeError as e:
            raise N2NError(f"{arch.source}: node {node.name!r} ({node.op}): {e}") from None
    return shapes


def _similar_keys(key: str, tensors: TensorStore) -> str:
    from .errors import did_you_mean

    return did_you_mean(key, tensors.keys())


# ---------------------------------------------------------------------------------- loading


def load_model(checkpoint: str, arch: Optional[str] = None, fallback_arch: Optional[str] = None,
               seq_len: Optional[int] = None) -> Model:
    """Open `checkpoint` (a path, or ``-`` for stdin) with its architecture and check it.

    Args:
        checkpoint: safetensors file; ``-`` reads standard input.
        arch: architecture YAML file. Optional when the checkpoint was written by this tool
            (it carries its architecture in the ``n2n.arch`` metadata); given both, this wins.
        fallback_arch: architecture file used only when `arch` is None and the checkpoint
            carries none (e.g. ``n2n verify`` comparing two plain state_dict checkpoints).
        seq_len: for a Hugging Face folder (``config.json`` beside the tensors, whose
            architecture is built from the config): the token positions probed.

    Example:
        >>> m = load_model("recipes/mlp.safetensors", "recipes/mlp.yaml")
        >>> m.shapes["fc2"]
        (32,)
    """
    from .hf_folder import is_hf_folder, load_hf_model

    if is_hf_folder(checkpoint):
        return load_hf_model(checkpoint, arch, seq_len)
    if seq_len is not None:
        raise N2NError(f"{checkpoint}: --seq-len applies to a Hugging Face model folder (config.json beside the tensors); "
                       "an n2n checkpoint's input shape is in its architecture")
    ckpt = open_any(checkpoint)
    source = ckpt.source
    if arch is not None:
        architecture = load_architecture(arch)
    elif META_ARCH in ckpt.metadata:
        architecture = parse_architecture(ckpt.metadata[META_ARCH], source=f"{source} (its n2n.arch metadata)")
    elif fallback_arch is not None:
        architecture = load_architecture(fallback_arch)
    else:
        raise N2NError(f"{source}: the checkpoint carries no architecture (n2n.arch metadata); pass --arch FILE{_arch_beside(checkpoint)}")
    history = read_history(ckpt)
    extra = {k: v for k, v in ckpt.metadata.items() if k not in (META_ARCH, META_HISTORY, META_FORMAT)}
    return Model(architecture, TensorStore(ckpt), history, extra, source).check()


def read_history(ckpt) -> list:
    """The checkpoint's n2n.history metadata (a JSON list), or [] when it has none."""
    if META_HISTORY not in ckpt.metadata:
        return []
    try:
        history = parse_json(ckpt.metadata[META_HISTORY])
    except JSONRefused as e:
        raise N2NError(f"{ckpt.source}: metadata n2n.history is not valid JSON ({e})") from None
    if not isinstance(history, list):
        raise N2NError(f"{ckpt.source}: metadata n2n.history must be a JSON list")
    return history


def _arch_beside(checkpoint: str) -> str:
    """' (NAME.yaml lies beside it)' when the usual architecture file sits next to the checkpoint."""
    import os

    stem, ext = os.path.splitext(checkpoint)
    if checkpoint == "-" or ext != ".safetensors":
        return ""
    for candidate in (stem + ".yaml", stem + ".yml"):
        if os.path.isfile(candidate):
            return f" ({candidate} lies beside it)"
    return ""


def model_from_state_dict(arch: Architecture | str, state_dict: Mapping[str, torch.Tensor]) -> Model:
    """Bind an architecture (object or YAML text) to in-memory tensors, e.g. a module's state_dict()."""
    if isinstance(arch, str):
        arch = parse_architecture(arch)
    return Model(arch, TensorStore.from_tensors(state_dict), source="<state_dict>").check()


def checkpoint_metadata(model: Model) -> dict:
    meta = dict(model.metadata)
    meta[META_FORMAT] = "pt"
    meta[META_ARCH] = model.arch.to_yaml()
    meta[META_HISTORY] = json.dumps(model.history, sort_keys=True, separators=(",", ":"))
    return meta


def save_model(model: Model, dest: str, max_shard_size: int | str | None = None, output_format: Optional[str] = None) -> None:
    """Write `model` as a safetensors checkpoint carrying its architecture and history.

    Written atomically and streamed (memory holds about one tensor, whatever the model's size);
    ``-`` writes to standard output (never to a terminal).

    Args:
        model: the model to write.
        dest: output file, ``-``, or with `max_shard_size` the output folder.
        max_shard_size: bytes (or a size such as ``"2GiB"``) per shard; when given, `dest` is a
            folder holding Hugging Face style shards and ``model.safetensors.index.json``
            (see :mod:`n2nsurgery.shards`).
        output_format: ``"n2n"`` or ``"hf"``; default (None): a Hugging Face folder when the
            model was read from one (:mod:`n2nsurgery.hf_folder`), else an n2n checkpoint.

    Example:
        >>> m = load_model("recipes/mlp.safetensors", "recipes/mlp.yaml")
        >>> save_model(m, "student.safetensors")
        >>> save_model(m, "student", max_shard_size="500MB")
    """
    from .hf_folder import write_hf_folder, writes_folder

    if writes_folder(model, dest, output_format):
        write_hf_folder(model, dest, max_shard_size)
        return
    mode = input_mode(model)
    if max_shard_size is not None:
        write_sharded(dest, model.tensors.sources(), checkpoint_metadata(model), max_shard_size, mode=mode)
        return
    write_checkpoint(dest, model.tensors.sources(), checkpoint_metadata(model), mode=mode)


def input_mode(model: Model) -> Optional[int]:
    """The permission bits a new output of `model` starts from: those of its input file (the
    bits every shard and the index share, for a sharded input), as ``cp`` copies a source's
    mode; None when it was read from standard input or built in memory (then 0o666).

    So a private checkpoint (0600) never gives a world-readable student.
    """
    base = model.tensors.base
    paths = [getattr(base, "source", None)] + [s.source for s in (getattr(base, "shards", None) or {}).values()]
    mode = None
    for path in paths:
        try:
            bits = os.stat(path).st_mode & 0o777 if isinstance(path, str) and path != "<stdin>" else None
        except OSError:  # gone meanwhile: the others (or the default) decide
            bits = None
        if bits is not None:
            mode = bits if mode is None else mode & bits
    return mode
