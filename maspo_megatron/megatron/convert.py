"""Hugging Face safetensors <-> megatron-core weights, one tensor (slice) at a time.

Import (:func:`load_hf_checkpoint`): every rank reads, with ``safe_open(...).get_slice``, only
the rows/columns of each HF tensor that its own TP shard of its own pipeline stage needs, so a
70B checkpoint is never materialised on one rank. Before any read, every rank validates the
whole checkpoint (names and shapes from the safetensors headers, which is cheap), so a bad
checkpoint fails identically on all ranks instead of leaving some of them blocked in a
collective.

Export (:func:`export_hf`): a generator of ``(hf_name, tensor)`` for the layers of this rank's
pipeline stage (all its model chunks, with virtual pipeline stages: chunk by chunk), named with
their *global* layer indices (``model.layers.<global>.``). Each
tensor is all-gathered over the TP group just before it is yielded, so at most one full tensor
is alive at a time; every TP rank of the stage must iterate the generator in lockstep and gets
the same full tensors. Nothing is exchanged between pipeline stages: to cover the whole model,
run it on every stage (weight sync sends each stage's tensors from its TP-rank-0;
:func:`save_hf` writes one set of shards per stage and a common index).

Mixture-of-experts models (expert rules, ``ParamRule.expert``): expert-parallel rank ``r``
holds, reads and exports only its own experts (global index ``r * E/EP + j`` for local ``j``),
gathered over the expert-tensor-parallel group instead of TP. No rank ever holds all experts:
with ``owned=True`` (save_hf, weight sync) the dense tensors come from TP-rank 0 of the first
data-parallel replica and each expert from expert-TP-rank 0 of the first expert-data-parallel
replica that holds it, i.e. every expert-parallel rank sends its own experts.

Megatron layouts handled here (verified against megatron-core 0.19's ``SelfAttention`` and
``MLP``):

- ``linear_qkv`` (weight and bias) is ``[q_g (heads_per_group*d); k_g (d); v_g (d)]`` for each
  query group ``g`` in order, and that whole interleaved tensor is split contiguously along
  dim 0 over TP (also when there are fewer query groups than TP ranks).
- ``linear_fc1`` is ``[gate_r; up_r]`` on each TP rank r (SwiGLU chunks the local output).
- The vocabulary is padded to ``spec.padded_vocab_size``: zero rows on import, stripped on
  export.
- Norm weights live in ``input_layernorm`` / ``pre_mlp_layernorm`` in the local spec and inside
  ``linear_qkv`` / ``linear_fc1`` (``layer_norm_weight``) in the TE spec; the name actually
  present in the model's state dict is used.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from maspo_megatron.megatron.families import ArchConfig, ParamRule, ShardKind
from maspo_megatron.megatron.model import ModelSpec, global_layer_indices, model_spec, unwrap_model
from maspo_megatron.tensors import bucket_named_tensors

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
# Tensors some HF checkpoints carry that are not weights of the model we build.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Files save_hf copies from tokenizer_dir (tokenizer + generation settings + chat template).
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


class CheckpointError(ValueError):
    """The HF checkpoint does not match the model (names the tensor and the file)."""


class HFCheckpoint:
    """Lazy reader of a safetensors checkpoint directory (single file or index + shards)."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = os.fspath(path)
        index = os.path.join(self.path, SAFE_INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                self.weight_map: dict[str, str] = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(self.path, SAFE_SINGLE)):
            self.weight_map = {}
        else:
            raise CheckpointError(f"no {SAFE_INDEX} or {SAFE_SINGLE} in {self.path}")
        files = sorted(set(self.weight_map.values())) or [SAFE_SINGLE]
        self._handles = {}
        for name in files:
            full = os.path.join(self.path, name)
            if not os.path.isfile(full):
                raise CheckpointError(f"{SAFE_INDEX} in {self.path} lists {name}, which does not exist")
            self._handles[name] = safe_open(full, framework="pt")
        if not self.weight_map:
            self.weight_map = {k: SAFE_SINGLE for k in self._handles[SAFE_SINGLE].keys()}

    def names(self) -> set[str]:
        return set(self.weight_map)

    def file_of(self, name: str) -> str:
        if name not in self.weight_map:
            raise CheckpointError(f"missing tensor {name!r} in checkpoint {self.path}")
        return self.weight_map[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of(name)].get_slice(name).get_shape())

    def read(self, name: str, dim: int | None = None, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The whole tensor, or rows (``dim=0``) / columns (``dim=1``) ``[start, end)`` of it."""
        sl = self._handles[self.file_of(name)].get_slice(name)
        if dim is None:
            return sl[:]
        return sl[start:end] if dim == 0 else sl[:, start:end]

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> HFCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class _Bound:
    """A rule resolved against one model chunk: the parameter and its HF names."""

    key: str
    param: torch.Tensor
    rule: ParamRule
    hf_names: tuple[str, ...]

    @property
    def expert(self) -> bool:
        return self.rule.expert


def _rules(spec: ModelSpec):
    return spec.family.param_rules(spec.arch)


def _hf_names(rule: ParamRule, layer: int | None, expert: int | None = None) -> tuple[str, ...]:
    return tuple(n.format(layer=layer, expert=expert) for n in rule.hf) if layer is not None else rule.hf


def _local_experts(spec: ModelSpec) -> range:
    """Global indices of the experts this expert-parallel rank holds (empty for dense models)."""
    if spec.arch.moe is None:
        return range(0)
    from megatron.core import parallel_state as ps

    count = spec.arch.moe.num_experts // ps.get_expert_model_parallel_world_size()
    first = ps.get_expert_model_parallel_rank() * count
    return range(first, first + count)


def _bind(chunk) -> list[_Bound]:
    """Every parameter of ``chunk`` with its rule; errors if one has no mapping."""
    model = unwrap_model(chunk)
    spec = model.maspo_spec
    state = {k: v for k, v in model.state_dict(keep_vars=True).items()
             if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)}
    model_rules, layer_rules = _rules(spec)
    bound: list[_Bound] = []

    def take(prefix: str, rule: ParamRule, layer: int | None, required: bool, expert: int | None = None,
             local: int | None = None) -> None:
        names = [prefix + n.format(expert=local) for n in (rule.megatron, *rule.aliases)]
        for key in names:
            if key in state:
                bound.append(_Bound(key, state.pop(key), rule, _hf_names(rule, layer, expert)))
                return
        if required:
            raise RuntimeError(f"{spec.family.name}: model has none of {names}")

    # Order like HF: embedding, layers, final norm, output layer (stage-local parts only).
    first = [r for r in model_rules if r.megatron.startswith("embedding.")]
    last = [r for r in model_rules if not r.megatron.startswith("embedding.")]
    for rule in first:
        take("", rule, None, required=False)
    experts = _local_experts(spec)
    for local, layer in enumerate(global_layer_indices(model)):
        for rule in layer_rules:
            if rule.expert:
                for j, expert in enumerate(experts):
                    take(f"decoder.layers.{local}.", rule, layer, True, expert, j)
            else:
                take(f"decoder.layers.{local}.", rule, layer, required=True)
    for rule in last:
        take("", rule, None, required=False)
    if state:
        raise RuntimeError(f"{spec.family.name}: Megatron parameters without an HF mapping: {sorted(state)}")
    return bound


def _chunks(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _tp(expert: bool = False):
    """(rank, size, group) of the group a parameter is split over: TP, or expert-TP for experts."""
    from megatron.core import parallel_state as ps

    if expert:
        return (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size(),
                ps.get_expert_tensor_parallel_group())
    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_group())


# ---------------------------------------------------------------------------- QKV layout


def _qkv_geometry(arch: ArchConfig) -> tuple[int, int]:
    """(query rows per group, rows of one group in the fused layout)."""
    q_rows = arch.num_attention_heads // arch.num_query_groups * arch.head_dim
    return q_rows, q_rows + 2 * arch.head_dim


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ArchConfig) -> torch.Tensor:
    """HF q, k, v rows of whole query groups -> megatron's per-group interleaved rows."""
    q_rows, _ = _qkv_geometry(arch)
    groups, rest = k.shape[0] // arch.head_dim, q.shape[1:]
    return torch.cat([q.reshape(groups, q_rows, *rest), k.reshape(groups, arch.head_dim, *rest),
                      v.reshape(groups, arch.head_dim, *rest)], dim=1).reshape(-1, *rest)


def _split_qkv(fused: torch.Tensor, arch: ArchConfig) -> tuple[torch.Tensor, ...]:
    q_rows, group_rows = _qkv_geometry(arch)
    rest = fused.shape[1:]
    q, k, v = fused.reshape(-1, group_rows, *rest).split([q_rows, arch.head_dim, arch.head_dim], dim=1)
    return tuple(t.reshape(-1, *rest) for t in (q, k, v))


# ---------------------------------------------------------------------------- import


def _validate(ckpt: HFCheckpoint, spec: ModelSpec) -> None:
    """Checks names and shapes of the whole model's HF tensors (headers only)."""
    model_rules, layer_rules = _rules(spec)
    expected: dict[str, tuple[int, ...]] = {}
    for rule in model_rules:
        expected.update(zip(rule.hf, rule.hf_shapes))
    experts = range(spec.arch.moe.num_experts) if spec.arch.moe else range(0)
    for layer in range(spec.arch.num_layers):
        for rule in layer_rules:
            for expert in (experts if rule.expert else (None,)):
                expected.update(zip(_hf_names(rule, layer, expert), rule.hf_shapes))
    for name, shape in expected.items():
        found = ckpt.shape(name)
        if found != tuple(shape):
            raise CheckpointError(
                f"tensor {name!r} in {os.path.join(ckpt.path, ckpt.file_of(name))} has shape "
                f"{list(found)}, expected {list(shape)} for this {spec.family.name} config"
            )
    ignored = {"lm_head.weight"} if spec.arch.tie_word_embeddings else set()
    unexpected = sorted(n for n in ckpt.names() - expected.keys() - ignored if not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise CheckpointError(
            f"checkpoint {ckpt.path} has tensors this {spec.family.name} config does not use "
            f"(wrong config.json?): {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )


def _read_shard(ckpt: HFCheckpoint, b: _Bound, spec: ModelSpec, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's piece of ``b``'s HF tensor(s), in megatron's layout."""
    kind, names, rows = b.rule.kind, b.hf_names, b.param.shape[0]
    start, end = tp_rank * rows, (tp_rank + 1) * rows
    if kind is ShardKind.REPLICATED:
        return ckpt.read(names[0])
    if kind is ShardKind.COLUMN:
        return ckpt.read(names[0], 0, start, end)
    if kind is ShardKind.ROW:
        cols = b.param.shape[1]
        return ckpt.read(names[0], 1, tp_rank * cols, (tp_rank + 1) * cols)
    if kind is ShardKind.GATE_UP:
        half = rows // 2
        return torch.cat([ckpt.read(n, 0, tp_rank * half, (tp_rank + 1) * half) for n in names])
    if kind is ShardKind.VOCAB:
        real = ckpt.read(names[0], 0, min(start, spec.vocab_size), min(end, spec.vocab_size))
        pad = real.new_zeros((rows - real.shape[0], *real.shape[1:]))
        return torch.cat([real, pad])
    if kind is ShardKind.QKV:
        # Read the query groups this row range touches (one group at most beyond it when a
        # group is split over TP ranks), fuse them, cut the exact rows.
        arch = spec.arch
        q_rows, group_rows = _qkv_geometry(arch)
        g0, g1 = start // group_rows, -(-end // group_rows)
        d = arch.head_dim
        q = ckpt.read(names[0], 0, g0 * q_rows, g1 * q_rows)
        k = ckpt.read(names[1], 0, g0 * d, g1 * d)
        v = ckpt.read(names[2], 0, g0 * d, g1 * d)
        offset = g0 * group_rows
        return _fuse_qkv(q, k, v, arch)[start - offset:end - offset]
    raise AssertionError(kind)


@torch.no_grad()
def load_hf_checkpoint(model, hf_dir: str | os.PathLike) -> None:
    """Loads an HF safetensors checkpoint into this rank's chunk(s), in place.

    Call on every rank (no collectives are used; each rank reads its own slices). Raises
    :class:`CheckpointError` naming the tensor for a missing tensor or a wrong shape, and for
    tensors the config does not account for. Load before creating the optimizer (or reload its
    fp32 main parameters afterwards).
    """
    with HFCheckpoint(hf_dir) as ckpt:
        validated = False
        for chunk in _chunks(model):
            spec = model_spec(chunk)
            if not validated:
                _validate(ckpt, spec)
                validated = True
            for b in _bind(chunk):
                tp_rank, tp, _ = _tp(b.expert)
                shard = _read_shard(ckpt, b, spec, tp_rank, tp)
                if shard.shape != b.param.shape:
                    raise RuntimeError(f"internal: {b.hf_names} -> {b.key} gave shape {list(shard.shape)}, "
                                       f"parameter has {list(b.param.shape)}")
                b.param.copy_(shard)


# ---------------------------------------------------------------------------- export


def _gather(local: torch.Tensor, tp: int, group) -> list[torch.Tensor]:
    if tp == 1:
        return [local]
    local = local.contiguous()
    shards = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(shards, local, group=group)
    return shards


def _to_hf(b: _Bound, shards: list[torch.Tensor], spec: ModelSpec) -> Iterator[tuple[str, torch.Tensor]]:
    kind, names = b.rule.kind, b.hf_names
    if kind is ShardKind.REPLICATED:
        yield names[0], shards[0]
    elif kind is ShardKind.COLUMN:
        yield names[0], torch.cat(shards)
    elif kind is ShardKind.ROW:
        yield names[0], torch.cat(shards, dim=1)
    elif kind is ShardKind.VOCAB:
        yield names[0], torch.cat(shards)[:spec.vocab_size]
    elif kind is ShardKind.GATE_UP:
        halves = [s.chunk(2) for s in shards]
        yield names[0], torch.cat([h[0] for h in halves])
        yield names[1], torch.cat([h[1] for h in halves])
    elif kind is ShardKind.QKV:
        yield from zip(names, _split_qkv(torch.cat(shards), spec.arch))
    else:
        raise AssertionError(kind)


def export_roles() -> tuple[bool, bool, bool, bool]:
    """This rank's part in an ``owned=True`` export: (takes part in the dense tensors' gathers,
    writes them, takes part in its experts' gathers, writes them). See the module docstring."""
    from megatron.core import parallel_state as ps

    dense = ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
    experts = ps.get_expert_data_parallel_rank() == 0
    return (dense, dense and ps.get_tensor_model_parallel_rank() == 0,
            experts, experts and ps.get_expert_tensor_parallel_rank() == 0)


@torch.no_grad()
def export_hf(model, *, dtype: torch.dtype | None = None, owned: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields ``(hf_name, full_tensor)`` for this pipeline stage's parameters (see module doc):
    the dense ones and this expert-parallel rank's experts.

    Collective over the TP group (and the expert-TP group for experts): all its ranks must
    consume the generator together. ``owned=True``: only the tensors this rank writes or sends
    (:func:`export_roles`; every rank of the stage must iterate, those that write nothing take
    part in the gathers). Tensors are on the parameters' device and may alias live parameters
    (when no gather or cast was needed): copy them if they must outlive the next optimizer step.
    ``dtype`` casts.
    """
    gather_dense, write_dense, gather_experts, write_experts = export_roles() if owned else (True,) * 4
    for chunk in _chunks(model):
        spec = model_spec(chunk)
        for b in _bind(chunk):
            if not b.rule.export or not (gather_experts if b.expert else gather_dense):
                continue
            _, tp, group = _tp(b.expert)
            local = b.param.detach()
            shards = [local] if b.rule.kind is ShardKind.REPLICATED else _gather(local, tp, group)
            if not (write_experts if b.expert else write_dense):
                continue
            for name, tensor in _to_hf(b, shards, spec):
                yield name, tensor if dtype is None else tensor.to(dtype)


def save_hf(model, out_dir: str | os.PathLike, hf_config=None, tokenizer_dir: str | os.PathLike | None = None,
            *, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes an HF checkpoint (safetensors shards + index, config.json, tokenizer files).

    Collective over all ranks. ``out_dir`` must be one directory visible to every rank (shared
    filesystem). Ranks of data-parallel (and context-parallel) replica 0 gather their stage's
    tensors over TP; TP-rank-0 of each stage writes them (experts: each expert-parallel rank
    writes its own, see :func:`export_hf` ``owned``); global rank 0 renames the shards into
    HF's ``model-0000i-of-0000n.safetensors`` scheme (``model.safetensors`` if there is only one)
    and writes the index, ``config.json`` (``hf_config``, default the model's, with ``dtype``
    set to the exported dtype) and the tokenizer files found in ``tokenizer_dir``.
    """
    from megatron.core import parallel_state as ps

    out_dir = os.fspath(out_dir)
    chunks = _chunks(model)
    spec = model_spec(chunks[0])
    hf_config = spec.hf_config if hf_config is None else hf_config
    world_rank = dist.get_rank()
    if world_rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    dist.barrier()

    written: list[tuple[str, list[str], int]] = []  # (temp file, tensor names, bytes)
    stage = ps.get_pipeline_model_parallel_rank()
    # Virtual stage v of pipeline stage s holds layer block v * pp + s: files per chunk.
    for vp, chunk in enumerate(chunks):
        for part, bucket in enumerate(bucket_named_tensors(export_hf([chunk], dtype=dtype, owned=True),
                                                           max_shard_bytes)):
            from safetensors.torch import save_file

            tensors = {n: t.detach().to("cpu").contiguous() for n, t in bucket}
            # Several writers per stage with experts: the world rank keeps their names apart.
            temp = f".vp{vp:03d}-stage{stage:04d}-rank{world_rank:06d}-part{part:05d}.safetensors"
            save_file(tensors, os.path.join(out_dir, temp), metadata={"format": "pt"})
            written.append((temp, list(tensors), sum(t.numel() * t.element_size() for t in tensors.values())))
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, written)
    if world_rank == 0:
        files = sorted((f for rank_files in gathered for f in rank_files), key=lambda f: f[0])
        # Sorted by temp name = virtual stage, stage, writer, part: HF's order of layers.
        _finalize(out_dir, files, hf_config, tokenizer_dir, dtype or spec.transformer_config.params_dtype)
    dist.barrier()


def _finalize(out_dir: str, files: list[tuple[str, list[str], int]], hf_config, tokenizer_dir,
              dtype: torch.dtype) -> None:
    if len(files) == 1:
        os.replace(os.path.join(out_dir, files[0][0]), os.path.join(out_dir, SAFE_SINGLE))
    else:
        weight_map = {}
        for i, (temp, names, _) in enumerate(files):
            final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            os.replace(os.path.join(out_dir, temp), os.path.join(out_dir, final))
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": sum(f[2] for f in files)}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out_dir, SAFE_INDEX), "w") as f:
            json.dump(index, f, indent=2)
    config = copy.deepcopy(hf_config)
    config.dtype = dtype
    config.save_pretrained(out_dir)
    if tokenizer_dir is not None:
        for name in _TOKENIZER_FILES:
            src = os.path.join(os.fspath(tokenizer_dir), name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(out_dir, name))


__all__ = [
    "CheckpointError",
    "HFCheckpoint",
    "export_hf",
    "export_roles",
    "load_hf_checkpoint",
    "save_hf",
]
