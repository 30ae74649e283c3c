"""Megatron weights -> rollout servers, every step, without gathering the model on one rank,
and the proof that the servers then compute what the trainer computes.

One sender per pipeline stage: TP rank 0 of the first data-parallel replica streams its stage's
HF-named tensors (``megatron.convert.export_hf``) into the servers' weight-update group; its TP
peers take part in the per-tensor TP all-gathers of the export; other data-parallel replicas
hold the same weights and do nothing. Stages take turns (SGLang handles one update call at a
time). Collective over all ranks.

The proof (:class:`WeightProof`): after every sync, the trainer's Megatron log-probs of a fixed
probe (a few short token sequences) are compared with each server's own log-probs of the same
tokens (one prefill per sequence, the engine's prompt log-prob output) before any sample from
that server is used. Unlike reading weights back, this sees everything between the two models:
a name or layout bug in the HF export (e.g. permuted heads), a tensor that was not sent, a
server that kept or reloaded other weights, and any disagreement in how the two compute. Its cost
is a forward over ``sequences x length`` tokens on each side.
"""

from __future__ import annotations

import asyncio
import logging

import torch
import torch.distributed as dist

from maspo_megatron.megatron.convert import export_hf
from maspo_megatron.rollout.weight_sync import ProofConfig, WeightSyncConfig, WeightSyncer, make_turn_barrier

logger = logging.getLogger(__name__)


class WeightProofError(RuntimeError):
    """The servers' log-probs after a sync differ from the trainer's: names server, version, gap."""


class WeightProof:
    """Trainer-vs-server log-probs of a fixed probe; collective over all ranks."""

    def __init__(self, cfg: ProofConfig, vocab_size: int, dp_size: int, atol: float):
        g = torch.Generator().manual_seed(cfg.seed)
        n = max(cfg.sequences, dp_size)
        self.ids = torch.randint(0, vocab_size, (n, cfg.length), generator=g)
        self.atol = atol

    def batch(self):
        from maspo_megatron.megatron.actor import SequenceBatch

        n, length = self.ids.shape
        mask = torch.ones(n, length, dtype=torch.bool)
        mask[:, 0] = False  # the first token has no prefix to predict it from
        return SequenceBatch(input_ids=self.ids.clone(), lengths=torch.full((n,), length),
                             response_mask=mask)

    def check(self, actor, client, urls: list[str], version) -> dict[str, float]:
        """Raises :class:`WeightProofError` on every rank when any server disagrees."""
        # Untempered on both sides: the engine's prompt log-probs are log_softmax(logits).
        ours, _ = actor.compute_logprobs(self.batch(), temperature=1.0)
        ours = ours[:, 1:]
        verdict = [None, {}]
        if dist.get_rank() == 0:
            try:
                verdict[1] = self.compare(ours, client, urls, version)
            except WeightProofError as e:
                verdict[0] = str(e)
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise WeightProofError(verdict[0])
        return verdict[1]

    def compare(self, ours: torch.Tensor, client, urls: list[str], version) -> dict[str, float]:
        """Rank-0 half: ``ours`` [sequences, length - 1] against every server's log-probs."""
        async def all_scores():
            return await asyncio.gather(*[client.score(self.ids.tolist(), url) for url in urls])

        worst = 0.0
        for url, rows in zip(urls, asyncio.run(all_scores())):
            theirs = torch.tensor(rows, dtype=torch.float32)
            gap = (theirs - ours).abs()
            if not bool(gap.max() <= self.atol):  # NaN fails too
                r, t = divmod(int(torch.nan_to_num(gap, nan=float("inf")).argmax()), gap.shape[1])
                raise WeightProofError(
                    f"weight sync v{version}: server {url} disagrees with the trainer: max "
                    f"|log-prob difference| {gap.max().item():.3g} (mean {gap.mean().item():.3g}) over "
                    f"{gap.numel()} probe tokens, tolerance {self.atol:g}; worst at probe {r} token "
                    f"{t + 1}: trainer {ours[r, t].item():.5f}, server {theirs[r, t].item():.5f}. "
                    "The server does not hold the trainer's weights (export bug, a tensor not "
                    "sent, or a server that reloaded others); stopping before using its samples")
            worst = max(worst, gap.max().item())
        return {"sync/proof_max_abs_diff": worst}


class WeightPublisher:
    def __init__(self, server_urls: list[str], cfg: WeightSyncConfig, *, engine_ranks_per_server: int = 1,
                 backend: str = "sglang"):
        from megatron.core import parallel_state as ps

        from maspo_megatron.runtime import device

        self.colocated = cfg.mode == "colocated"
        self.in_export = ps.get_data_parallel_rank() == 0
        self.is_sender = self.in_export and ps.get_tensor_model_parallel_rank() == 0
        pp_rank = ps.get_pipeline_model_parallel_rank()
        pp_size = ps.get_pipeline_model_parallel_world_size()
        flags = [None] * dist.get_world_size()
        dist.all_gather_object(flags, self.is_sender)
        senders = [r for r, s in enumerate(flags) if s]
        # new_group is collective over the world, senders or not.
        group = dist.new_group(senders) if len(senders) > 1 else None
        self.syncer = None
        if self.is_sender:
            barrier = make_turn_barrier(group, device()) if pp_size > 1 else None
            self.syncer = WeightSyncer(server_urls, cfg, backend=backend,
                                       engine_ranks_per_server=engine_ranks_per_server,
                                       sender_index=pp_rank, num_senders=pp_size, turn_barrier=barrier)

    @property
    def _lead(self) -> bool:
        return self.syncer is not None and self.syncer.sender_index == 0

    def release_rollout_memory(self) -> None:
        """Colocated mode: the servers free their GPU memory for training (collective)."""
        if not self.colocated:
            return
        if self._lead:
            self.syncer.release_memory()
        # No rank may allocate for training before the servers have let go.
        dist.barrier()

    def publish(self, model, version: int) -> float:
        """Sends the weights; returns the sync's GB/s as measured by global rank 0.

        Colocated mode: the servers' weight memory comes back first, their KV cache after the
        new weights are in (SGLang's documented order).
        """
        gbps = [0.0]
        if self.colocated and self._lead:
            self.syncer.resume_memory(["weights"])
        if self.colocated:
            dist.barrier()
        if self.in_export:
            named = export_hf(model)
            if self.is_sender:
                gbps[0] = self.syncer.sync(named, version).gbps
            else:
                for _ in named:  # TP peer: join the export's all-gathers
                    pass
        if self.colocated and self._lead:
            self.syncer.resume_memory(["kv_cache", "cuda_graph"])
        dist.broadcast_object_list(gbps, src=0)
        return gbps[0]

    def reset(self) -> None:
        """Drops the weight-update group (e.g. after a server restart); the next publish rebuilds it."""
        if self.syncer is not None:
            try:
                self.syncer.close()
            except Exception as e:  # noqa: BLE001 - the restarted server never knew the old group
                logger.warning("closing the old weight-update group: %s", e)

    def close(self) -> None:
        if self.syncer is not None:
            self.syncer.close()
