"""Hugging Face model folders as checkpoints: read one, write one (SPEC §6).

A Hugging Face folder is ``config.json`` plus ``model.safetensors`` (or an index and shards),
usually with tokenizer files and ``generation_config.json`` beside them.

**Reading.** :func:`load_hf_model` builds the architecture from ``config.json`` with
:func:`~n2nsurgery.hf_arch.arch_from_config` (node names = module paths, keys = the folder's
own tensor keys), opens the tensors with :func:`~n2nsurgery.storage.open_any`, and remembers
where they came from (:class:`HFOrigin`) so a student can be written back as a folder.

**Writing.** :func:`write_hf_folder` derives the student's ``config.json`` from its graph and
tensor shapes (:func:`student_config`: every grown size pinned, so nothing is re-derived
differently by ``from_pretrained``), checks that the config describes the student exactly (the
architecture rebuilt from the new config must be the student's), and writes tensors, config
and every other file of the input folder (copied byte for byte) into a temporary folder that is
renamed into place, as sharded writes are (:mod:`n2nsurgery.shards`).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from typing import Optional

from .errors import N2NError

CONFIG_NAME = "config.json"
_CONFIG_LIMIT = 16 * 1024 * 1024  # real configs are a few KiB


@dataclass
class HFOrigin:
    """Where a model read from a Hugging Face folder came from, and how to write it back."""

    folder: str
    config: dict  # the parsed config.json, unchanged
    sharded: bool  # the input's layout: an index and shards, or one model.safetensors
    shard_bytes: Optional[int] = None  # the largest input shard's tensor bytes (the default limit)
    tensor_files: frozenset = field(default_factory=frozenset)  # file names holding tensors (not copied)
    seq_len: Optional[int] = None  # the --seq-len the architecture was built with


# ---------------------------------------------------------------------------------- reading


def is_hf_folder(path: str) -> bool:
    """Whether `path` is a folder holding a ``config.json`` (a Hugging Face model folder)."""
    return isinstance(path, str) and path != "-" and os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_NAME))


def read_config(folder: str) -> dict:
    """The parsed ``config.json`` of `folder`; a file that is not a JSON object is refused."""
    from .inputs import open_input, read_limited
    from .jsonio import JSONRefused, parse_json

    path = os.path.join(folder, CONFIG_NAME)
    with open_input(path, "a Hugging Face config") as f:
        raw = read_limited(f, _CONFIG_LIMIT, path, "a Hugging Face config")
    try:
        cfg = parse_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, JSONRefused) as e:
        raise N2NError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise N2NError(f"{path}: a config must be a JSON object, got {type(cfg).__name__}")
    return cfg


def load_hf_model(folder: str, arch: Optional[str] = None, seq_len: Optional[int] = None):
    """The model in Hugging Face folder `folder`, its architecture built from ``config.json``
    (or read from `arch`, which wins), its history from the tensors' n2n metadata if any."""
    from .arch import load_architecture
    from .hf_arch import arch_from_config
    from .model import META_ARCH, META_FORMAT, META_HISTORY, Model, TensorStore, read_history
    from .storage import open_any

    cfg = read_config(folder)
    config_path = os.path.join(folder, CONFIG_NAME)
    architecture = load_architecture(arch) if arch is not None else arch_from_config(cfg, seq_len, source=config_path)
    ckpt = open_any(folder)
    origin = _origin(folder, cfg, ckpt, seq_len)
    history = read_history(ckpt)
    extra = {k: v for k, v in ckpt.metadata.items() if k not in (META_ARCH, META_HISTORY, META_FORMAT)}
    model = Model(architecture, TensorStore(ckpt), history, extra, ckpt.source, hf=origin)
    return model.check()


def _origin(folder: str, cfg: dict, ckpt, seq_len: Optional[int]) -> HFOrigin:
    from .checkpoint import nbytes_of
    from .shards import INDEX_NAME, SINGLE_NAME

    shards = getattr(ckpt, "shards", None)
    if not shards:
        return HFOrigin(folder, cfg, False, None, frozenset({SINGLE_NAME}), seq_len)
    sizes = {}
    for key in ckpt.keys():
        name = ckpt.shard_of(key)
        sizes[name] = sizes.get(name, 0) + nbytes_of(ckpt.dtype(key), tuple(ckpt.shape(key)))
    files = frozenset(set(shards) | {os.path.basename(ckpt.source), INDEX_NAME})
    return HFOrigin(folder, cfg, True, max(sizes.values(), default=1), files, seq_len)


# ---------------------------------------------------------------------------------- config


def _shape(model, key: str) -> tuple:
    return tuple(model.tensors.shape(key))


def _blocks(model, prefix: str) -> list:
    """Indices of the blocks ``<prefix><i>`` in the student's graph, in order."""
    pattern = re.compile(r"^" + re.escape(prefix) + r"(\d+)$")
    return [int(m.group(1)) for m in (pattern.match(n.name) for n in model.arch.nodes) if m]


def _one_value(model, what: str, per_layer: dict, hint: str) -> int:
    """The value every layer agrees on, or a refusal naming the layers that differ."""
    values = sorted(set(per_layer.values()))
    if len(values) == 1:
        return values[0]
    if not values:
        raise N2NError(f"the student has no layers with {what}; write an n2n checkpoint instead (--format n2n)")
    common = max(values, key=lambda v: sum(1 for x in per_layer.values() if x == v))
    odd = [f"{name} ({v})" for name, v in per_layer.items() if v != common]
    raise N2NError(
        f"config.json has one {what} for all layers, but {', '.join(odd)} {'differs' if len(odd) == 1 else 'differ'} from the others ({common}); "
        f"grow every layer alike ({hint}), or write an n2n checkpoint with --format n2n"
    )


def _attention_attrs(model, names: list) -> dict:
    attrs = {}
    for name in names:
        a = model.arch.node(name).resolved_attrs()
        attrs[name] = (a.get("num_heads"), a.get("num_kv_heads"), a.get("head_dim"), (a.get("rope") or {}).get("theta"))
    return attrs


def _eps(model, names: list, hint: str) -> float:
    per = {n: model.arch.node(n).resolved_attrs().get("eps") for n in names}
    return _one_value(model, "norm eps", per, hint)


def student_config(model) -> dict:
    """The ``config.json`` of `model` (read from a Hugging Face folder, then grown): the input's
    config with every size the graph and tensors fix written out.

    Raises:
        N2NError: a growth the config cannot describe (one layer wider than the others), naming
            the layers and suggesting a glob or ``--format n2n``.
    """
    cfg = copy.deepcopy(model.hf.config)
    if cfg.get("model_type") == "gpt2":
        _gpt2_sizes(model, cfg)
    else:
        _llama_sizes(model, cfg)
    return cfg


def _llama_sizes(model, cfg: dict) -> None:
    layers = _blocks(model, "model.layers.")
    vocab, hidden = _shape(model, "model.embed_tokens.weight")
    up = {f"model.layers.{i}.mlp.up_proj": _shape(model, f"model.layers.{i}.mlp.up_proj.weight")[0] for i in layers}
    width = _one_value(model, "intermediate_size", up, "--layer 'model.layers.*.mlp.up_proj'")
    attn = _attention_attrs(model, [f"model.layers.{i}.self_attn" for i in layers])
    heads, kv_heads, head_dim, theta = _one_value(model, "attention shape (heads, kv heads, head_dim, rope theta)", attn,
                                                  "--layer 'model.layers.*.self_attn'")
    norms = [f"model.layers.{i}.{n}" for i in layers for n in ("input_layernorm", "post_attention_layernorm")]
    eps = _eps(model, norms + ["model.norm"], "widen the residual stream as a whole")
    cfg.update(vocab_size=vocab, hidden_size=hidden, intermediate_size=width, num_hidden_layers=len(layers),
               num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, rms_norm_eps=eps)
    _set_rope_theta(cfg, theta)
    cfg["tie_word_embeddings"] = model.arch.node("lm_head").param_key("weight") == "model.embed_tokens.weight"
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = _layer_types(cfg["layer_types"], len(layers))


def _set_rope_theta(cfg: dict, theta: float) -> None:
    """Write the rotary base where the input config kept it (transformers 5: rope_parameters)."""
    if isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"]["rope_theta"] = theta
        if "rope_theta" in cfg:
            cfg["rope_theta"] = theta
    else:
        cfg["rope_theta"] = theta


def _layer_types(types: list, count: int) -> list:
    """One entry per layer: the input's kind, which must be one for all (mixed kinds are sliding
    windows, which n2n refuses when reading anyway)."""
    kinds = sorted(set(types))
    if len(types) == count:
        return list(types)
    if len(kinds) != 1:
        raise N2NError(f"config.json layer_types mixes {', '.join(kinds)}; n2n cannot tell which kind the new layers take")
    return [kinds[0]] * count


def _gpt2_sizes(model, cfg: dict) -> None:
    layers = _blocks(model, "transformer.h.")
    vocab, hidden = _shape(model, "transformer.wte.weight")
    fc = {f"transformer.h.{i}.mlp.c_fc": _shape(model, f"transformer.h.{i}.mlp.c_fc.weight")[1] for i in layers}
    width = _one_value(model, "n_inner", fc, "--layer 'transformer.h.*.mlp.c_fc'")
    attn = _attention_attrs(model, [f"transformer.h.{i}.attn" for i in layers])
    heads = _one_value(model, "n_head", {k: v[0] for k, v in attn.items()}, "--layer 'transformer.h.*.attn'")
    norms = [f"transformer.h.{i}.{n}" for i in layers for n in ("ln_1", "ln_2")]
    eps = _eps(model, norms + ["transformer.ln_f"], "widen the residual stream as a whole")
    cfg.update(vocab_size=vocab, n_embd=hidden, n_inner=width, n_layer=len(layers), n_head=heads,
               n_positions=_shape(model, "transformer.wpe.weight")[0], layer_norm_epsilon=eps)
    cfg["tie_word_embeddings"] = model.arch.node("lm_head").param_key("weight") == "transformer.wte.weight"


def check_describes(model, cfg: dict) -> None:
    """Refuse a student whose graph is not the one `cfg` describes (a layer n2n added that no
    Hugging Face class has, say): ``from_pretrained`` would compute something else."""
    from .hf_arch import arch_from_config

    rebuilt = arch_from_config(cfg, model.hf.seq_len, source="the student's config.json")
    ours = {n.name: n for n in model.arch.nodes}
    theirs = {n.name: n for n in rebuilt.nodes}
    extra = [name for name in ours if name not in theirs]
    if extra:
        raise N2NError(
            f"config.json cannot describe node {extra[0]!r} ({ours[extra[0]].op}), which no "
            f"{cfg.get('model_type')} model has; write an n2n checkpoint with --format n2n"
        )
    for name, theirs_node in theirs.items():
        node = ours.get(name)
        if node is None or _signature(node) != _signature(theirs_node):
            raise N2NError(
                f"config.json cannot describe the student's node {name!r} as it is now; write an n2n checkpoint with --format n2n"
            )


def _signature(node) -> tuple:
    params = {role: node.param_key(role) for role in node.params} if node.params else {}
    return (node.op, tuple(node.inputs), json.dumps(node.resolved_attrs(), sort_keys=True, default=str), json.dumps(params, sort_keys=True))


# ---------------------------------------------------------------------------------- writing


def writes_folder(model, out: Optional[str], output_format: Optional[str]) -> bool:
    """Whether writing `model` to `out` makes a Hugging Face folder (``--format``)."""
    if output_format == "n2n" or out is None or out == "-":
        if output_format == "hf" and out == "-":
            raise N2NError("--format hf writes a folder, which cannot go to standard output; give -o FOLDER")
        return False
    if getattr(model, "hf", None) is None:
        if output_format == "hf":
            raise N2NError(f"{model.source}: --format hf needs a Hugging Face folder (config.json and tensors) as input; "
                           "drop --format hf to write an n2n checkpoint")
        return False
    return True


def check_output_folder(out: str, inputs: list, overwrite_input: bool, folder: str) -> None:
    """Refuse, before any work, an output folder n2n must not write: a file, a link, the input
    folder (unless `overwrite_input`), a missing parent, or an existing folder that is not a
    model folder this write would replace (see :func:`_replaceable_in`)."""
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise N2NError(f"{out}: the output folder {parent} does not exist; create it first (mkdir -p {parent})")
    if out.endswith((".safetensors", ".json")):
        raise N2NError(f"{out}: a Hugging Face model is written as a folder; give a folder name (or --format n2n for one file)")
    if os.path.islink(out) or (os.path.lexists(out) and not os.path.isdir(out)):
        raise N2NError(f"{out}: exists and is not a folder; give a new folder name")
    if not os.path.isdir(out):
        return
    if _same(out, folder) or any(_same(out, os.path.dirname(p)) for p in inputs):
        if not overwrite_input:
            raise N2NError(f"{out}: is the input folder, and writing there would replace it; give another -o, "
                           "or pass --overwrite-input to replace it (atomically, once the new folder is complete)")
        return
    names = sorted(os.listdir(out))
    if names and CONFIG_NAME not in names:
        raise N2NError(f"{out}: the folder exists and is not a model folder (no {CONFIG_NAME}); give a new folder name")
    ours = _replaceable_in(folder)
    for name in names:
        if not ours(os.path.join(out, name)):
            raise N2NError(f"{out}: the folder exists and holds {name!r}, which is not a file of a Hugging Face model "
                           "folder n2n writes; give a new folder name")


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _regular(path: str) -> bool:
    """A regular file (not a link, a folder, a device)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _replaceable_in(folder: str):
    """Which files of an old output folder a write from input `folder` may delete: regular files
    named as the write names its own (config, tensors, index, shards) or as the files it copies
    from the input folder. Anything else there is the user's, and the folder is refused."""
    from .shards import INDEX_NAME, SINGLE_NAME, _SHARD_NAME

    copied = {n for n in os.listdir(folder) if _regular(os.path.join(folder, n))} if os.path.isdir(folder) else set()

    def ours(path: str) -> bool:
        name = os.path.basename(path)
        known = name in (CONFIG_NAME, SINGLE_NAME, INDEX_NAME) or _SHARD_NAME.match(name) or name in copied
        return bool(known) and _regular(path)

    return ours


def write_hf_folder(model, dest: str, max_shard_size=None) -> dict:
    """Write `model` (read from a Hugging Face folder) to folder `dest` as a Hugging Face folder.

    Tensors go into ``model.safetensors`` or shards of at most `max_shard_size` bytes (default:
    the input's layout), ``config.json`` pins every size (:func:`student_config`), every other
    file of the input folder is copied unchanged, and the architecture and history go into the
    safetensors metadata (the index's, when sharded). Atomic: a temporary folder is renamed into
    place.

    Returns:
        The config written.
    """
    from .checkpoint import TempPath, data_size, fd_sink, stream_checkpoint
    from .model import checkpoint_metadata, input_mode
    from .shards import (SINGLE_NAME, _move_into_place, _write_all, _write_file, parse_size, plan_shards, shard_names,
                         write_shard_files)
    from . import progress

    origin = model.hf
    cfg = student_config(model)
    check_describes(model, cfg)
    check_output_folder(dest, [], True, origin.folder)
    tensors = model.tensors.sources()
    metadata = checkpoint_metadata(model)
    limit = parse_size(max_shard_size) if max_shard_size is not None else (origin.shard_bytes if origin.sharded else None)
    file_mode = (input_mode(model) or 0o644) & 0o777 & ~_umask()
    parent = os.path.dirname(os.path.abspath(dest))
    base = os.path.basename(os.path.abspath(dest))
    temp = TempPath(parent, base, ".tmp")
    try:
        try:
            tmp = temp.create_dir()
        except OSError as e:
            raise N2NError(f"{dest}: cannot write in {parent} ({e.strerror})") from None
        with progress.task(f"writing {base}/", data_size(tensors)) as bar:
            if limit is None:
                _write_file(os.path.join(tmp, SINGLE_NAME), lambda fd: stream_checkpoint(fd_sink(fd, bar), tensors, metadata), True, file_mode)
            else:
                plan = plan_shards(tensors, limit)
                write_shard_files(tmp, tensors, metadata, plan, shard_names(len(plan)), bar, True, file_mode)
        text = (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode("utf-8")
        _write_file(os.path.join(tmp, CONFIG_NAME), lambda fd: _write_all(fd, text), True, file_mode)
        _copy_extras(origin, tmp)
        os.chmod(tmp, file_mode | (file_mode & 0o444) >> 2)
        _move_into_place(tmp, dest, ours=_replaceable_in(origin.folder))
    except BaseException as e:
        temp.remove()
        if isinstance(e, OSError):
            raise N2NError(f"{dest}: write failed ({e.strerror})") from None
        raise
    return cfg


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _copy_extras(origin: HFOrigin, tmp: str) -> None:
    """Every other regular file of the input folder (tokenizer, generation config, README),
    copied byte for byte; sub-folders are not model files and are left out."""
    skip = set(origin.tensor_files) | {CONFIG_NAME}
    for name in sorted(os.listdir(origin.folder)):
        src = os.path.join(origin.folder, name)
        if name in skip or name.endswith(".safetensors") or not _regular(src):
            continue
        shutil.copyfile(src, os.path.join(tmp, name))


# ---------------------------------------------------------------------------------- summary


def summary(model) -> Optional[dict]:
    """Config-level facts of a model read from a Hugging Face folder (for ``n2n inspect``)."""
    if getattr(model, "hf", None) is None:
        return None
    cfg = model.hf.config
    gpt2 = cfg.get("model_type") == "gpt2"
    fields = ("vocab_size", "n_embd", "n_inner", "n_layer", "n_head", "n_positions") if gpt2 else (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim")
    sizes = {}
    for f in fields:
        sizes[f] = cfg.get(f)
    try:
        sizes.update({k: v for k, v in student_config(model).items() if k in fields})
    except N2NError:
        pass
    return {
        "family": cfg.get("model_type"),
        "architectures": cfg.get("architectures"),
        "sizes": sizes,
        "parameters": model.parameter_count(),
        "tied": bool(model.arch.node("lm_head").param_key("weight").endswith(("embed_tokens.weight", "wte.weight"))),
        "dtypes": sorted(str(d).removeprefix("torch.") for d in model.float_dtypes()),
        "layout": "sharded" if model.hf.sharded else "single file",
    }
