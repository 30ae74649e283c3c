"""Sending each data-parallel rank only its share of a batch, packed.

The driver (world rank 0) holds the whole right-padded :class:`SequenceBatch`; the actor decides
which rows each data-parallel rank gets (:meth:`Actor.deal`). Each share travels packed: every
per-token field (``[N, L, ...]``) as one flat stream over the share's real tokens, per-sequence
fields (``[N]``) as they are, int64 narrowed to int32. The driver sends share ``d`` point to
point to the first rank of DP index ``d``'s model-parallel group (TP x PP ranks, which need the
same rows), which broadcasts it inside that group. No other rank allocates the whole batch.

Fields are found from the dataclass, so a new per-token field travels without changes here.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from maspo_megatron.algo.metrics import Metrics, is_max_metric, metric_value
from maspo_megatron.megatron.actor import BatchShare, SequenceBatch
from maspo_megatron.runtime import device

DRIVER = 0
_NARROW = {torch.int64: torch.int32}
"""Wire dtypes: token ids (and other int64 fields) fit int32 (checked before sending)."""


def _token_positions(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every real token of right-padded rows with these lengths, row by row."""
    lengths = lengths.to(torch.long)
    rows = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    return rows, torch.arange(len(rows)) - starts[rows]


def pack_rows(batch: SequenceBatch, rows: torch.Tensor, mini_batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows ``rows`` of ``batch`` packed: per-token fields as ``[T, ...]`` over their real
    tokens (row by row), per-sequence fields as ``[n]``, plus ``mini_batch``; wire dtypes."""
    n, width = batch.input_ids.shape
    local_row, col_of = _token_positions(batch.lengths[rows])
    row_of = rows[local_row]
    out = {"mini_batch": mini_batch}
    for f in dataclasses.fields(SequenceBatch):
        value = getattr(batch, f.name)
        if value is None:
            continue
        if value.shape[:2] == (n, width):
            out[f.name] = value[row_of, col_of]
        elif value.shape[:1] == (n,):
            out[f.name] = value[rows]
        else:
            raise ValueError(f"SequenceBatch.{f.name} of shape {tuple(value.shape)} is neither per token "
                             f"[{n}, {width}, ...] nor per sequence [{n}]")
    for name, value in out.items():
        wire = _NARROW.get(value.dtype)
        if wire is not None:
            info = torch.iinfo(wire)
            if value.numel() and (int(value.min()) < info.min or int(value.max()) > info.max):
                raise ValueError(f"SequenceBatch.{name} does not fit {wire} on the wire")
            out[name] = value.to(wire)
    return out


def unpack_rows(packed: dict[str, torch.Tensor], per_token: list[str], dtypes: dict[str, torch.dtype]
                ) -> BatchShare:
    """The share back as a right-padded batch of its own rows (padded to its longest row)."""
    lengths = packed["lengths"]
    n, width = len(lengths), int(lengths.max())
    row_of, col_of = _token_positions(lengths)
    fields = {}
    for name, value in packed.items():
        value = value.to(dtypes[name])
        if name in per_token:
            padded = value.new_zeros((n, width, *value.shape[1:]))
            padded[row_of, col_of] = value
            value = padded
        fields[name] = value
    mini_batch = fields.pop("mini_batch")
    return BatchShare(SequenceBatch(**fields), mini_batch)


def _check(packed: dict[str, torch.Tensor], per_token: list[str]) -> None:
    """Sizes on receipt: per-token streams as long as the lengths add up to, one value per row
    elsewhere."""
    lengths = packed["lengths"]
    n, total = len(lengths), int(lengths.long().sum())
    if n < 1 or int(lengths.min()) < 1:
        raise ValueError(f"received a share with {n} rows and lengths {lengths.tolist()}")
    for name, value in packed.items():
        expected = total if name in per_token else n
        if value.shape[0] != expected:
            raise ValueError(f"received {name} with {value.shape[0]} entries, expected {expected} "
                             f"({'tokens' if expected == total else 'rows'} of the share)")


def send_shares(batch: SequenceBatch | None, deal: list[tuple[torch.Tensor, torch.Tensor]] | None
                ) -> tuple[BatchShare, int]:
    """Called on every rank; ``batch`` and ``deal`` (:meth:`Actor.deal`) only on the driver.

    Returns this rank's share and the bytes this rank received for it (the driver keeps its
    own share: 0 there).
    """
    from megatron.core import parallel_state as ps

    rank, world = dist.get_rank(), dist.get_world_size()
    if (rank == DRIVER) != (batch is not None):
        raise ValueError(f"rank {rank}: only the driver (rank {DRIVER}) passes the batch")
    group = ps.get_model_parallel_group()
    leader = dist.get_process_group_ranks(group)[0]
    where = [None] * world  # (DP index, its model-parallel group's first rank) of every rank
    dist.all_gather_object(where, (ps.get_data_parallel_rank(), leader))
    leaders = dict(where)
    layouts = None
    if rank == DRIVER:
        if leaders[0] != DRIVER or len(deal) != len(leaders):
            raise ValueError(f"a deal for {len(deal)} data-parallel ranks from rank {DRIVER}, "
                             f"but the DP groups are led by {leaders}")
        n, width = batch.input_ids.shape
        present = {f.name: v for f in dataclasses.fields(SequenceBatch) if (v := getattr(batch, f.name)) is not None}
        per_token = sorted(k for k, v in present.items() if v.shape[:2] == (n, width))
        dtypes = {k: v.dtype for k, v in present.items()} | {"mini_batch": torch.long}
        shares = [pack_rows(batch, rows, mini_batch) for rows, mini_batch in deal]
        layouts = [({k: (tuple(v.shape), v.dtype) for k, v in shares[d].items()}, per_token, dtypes)
                   for d, _ in where]
    # Each rank learns its share's layout (small objects); the tensors follow.
    box = [None]
    dist.scatter_object_list(box, layouts, src=DRIVER)
    shapes, per_token, dtypes = box[0]
    dev = device()
    received, packed = 0, {}
    for name, (shape, dtype) in shapes.items():
        if rank == DRIVER:
            for d in range(1, len(leaders)):
                dist.send(shares[d][name].to(dev), dst=leaders[d])
            t = shares[0][name].to(dev)
        else:
            t = torch.empty(shape, dtype=dtype, device=dev)
            if rank == leader:
                dist.recv(t, src=DRIVER)
                received += t.numel() * t.element_size()
        if group.size() > 1:
            dist.broadcast(t, src=leader, group=group)
            if rank != leader:
                received += t.numel() * t.element_size()
        packed[name] = t.cpu()
    _check(packed, per_token)
    return unpack_rows(packed, per_token, dtypes), received


def reduce_over_dp(metrics: Metrics) -> dict[str, float]:
    """Values of metrics each data-parallel rank computed over its share, as over the whole
    batch: totals and weights summed over the DP group (MAX for ``*_max`` totals)."""
    from megatron.core import parallel_state as ps

    keys = sorted(metrics)
    pairs = torch.stack([torch.stack([metrics[k].total, metrics[k].weight]) for k in keys]).double().to(device())
    top = pairs[:, 0].clone()
    group = ps.get_data_parallel_group()
    dist.all_reduce(pairs, group=group)
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    pairs, top = pairs.cpu(), top.cpu()
    return {k: metric_value(k, float(top[i] if is_max_metric(k) else pairs[i, 0]), float(pairs[i, 1]))
            for i, k in enumerate(keys)}
