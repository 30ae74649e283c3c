"""Megatron weights -> rollout servers, every step, without gathering the model on one rank,
and the proof that the servers then compute what the trainer computes.

One sender per pipeline stage: TP rank 0 of the first data-parallel replica streams its stage's
HF-named tensors (``megatron.convert.export_hf``; with virtual pipeline stages, those of each of
its model chunks) into the servers' weight-update group; its TP
peers take part in the per-tensor TP all-gathers of the export; other data-parallel replicas
hold the same weights and do nothing. Mixture-of-experts models add one sender per
expert-parallel rank of each stage (expert-TP rank 0 of the first expert-data-parallel replica):
each sends its own experts (the first also the dense tensors), so no rank gathers all experts.
All senders export at once; their buckets reach the servers interleaved, one at a time
(``WeightSyncer``'s token ring: an SGLang 0.5.23 server receives one update call at a time).
Collective over all ranks.

Changing servers: :meth:`WeightPublisher.publish` takes the servers of this sync, ``(url,
generation)`` pairs from rank 0 (the same on every rank); when they differ from the last ones (a
server died, or came back restarted) the weight-update group is rebuilt with them.
:meth:`WeightPublisher.publish_once` sends the current weights to restarted servers only, in a
group of their own, so the servers in service are not paused. A failed sync fails on every rank
alike (every sender's verdict is gathered and each rank raises the cause, from the sender where
it happened; each sender first drains its export so that its TP peers leave their
all-gathers), which lets the trainer drop a server that died during the sync and send again to
the others.

The proof (:class:`WeightProof`): after every sync, the trainer's Megatron log-probs of a fixed
probe (a few short token sequences) are compared with each server's own log-probs of the same
tokens (one batched prefill per server, the engine's prompt log-prob output) before any sample from
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

from maspo_megatron.megatron.convert import export_hf, export_roles
from maspo_megatron.rollout.backend import WeightSyncError
from maspo_megatron.rollout.weight_sync import PeerSyncError, ProofConfig, WeightSyncConfig, WeightSyncer

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
        # Untempered on both sides: the engine's prompt log-probs are log_softmax(logits). The
        # probe has no rollout routes: an MoE model routes with its own router on both sides.
        ours, _ = actor.compute_logprobs(self.batch(), temperature=1.0, replay=False)
        ours = ours[:, 1:]
        verdict = [None, {}]
        if dist.get_rank() == 0:
            try:
                verdict[1] = self.compare(ours, client, urls, version)
            except WeightProofError as e:
                verdict[0] = str(e)
            except Exception as e:  # noqa: BLE001 - e.g. a server that died: every rank must hear it
                verdict[0] = f"weight sync v{version}: the proof could not ask the servers {urls}: {e}"
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

        self.cfg, self.backend, self.engine_ranks_per_server = cfg, backend, engine_ranks_per_server
        self.colocated = cfg.mode == "colocated"
        if (ps.get_expert_model_parallel_world_size() > 1
                and ps.get_expert_tensor_parallel_world_size() != ps.get_tensor_model_parallel_world_size()):
            # A rank would then be a TP peer in another sender's dense all-gathers while also
            # exporting its own experts, in an order its peers do not share (a deadlock).
            raise NotImplementedError("weight sync with expert parallelism and parallel.etp != parallel.tp "
                                      "is not implemented; leave parallel.etp unset")
        _, writes_dense, _, writes_experts = export_roles()
        self.is_sender = writes_dense or writes_experts
        flags = [None] * dist.get_world_size()
        dist.all_gather_object(flags, self.is_sender)
        senders = [r for r, s in enumerate(flags) if s]
        self.sender_index = senders.index(dist.get_rank()) if self.is_sender else None
        self.num_senders = len(senders)
        # new_group is collective over the world, senders or not. gloo: the send token is tiny
        # and travels on the syncer's thread, beside the exporter's device collectives.
        group = dist.new_group(senders, backend="gloo") if len(senders) > 1 else None
        self.sender_group = group if self.is_sender else None
        self.targets = tuple((u, 0) for u in server_urls)
        self.syncer = self._make_syncer([u for u, _ in self.targets])

    def _make_syncer(self, urls: list[str]) -> WeightSyncer | None:
        if not self.is_sender or not urls:
            return None
        return WeightSyncer(urls, self.cfg, backend=self.backend,
                            engine_ranks_per_server=self.engine_ranks_per_server,
                            sender_index=self.sender_index, num_senders=self.num_senders,
                            sender_group=self.sender_group)

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

    def publish(self, model, version: int, targets=None) -> float:
        """Sends the weights; returns the sync's GB/s as measured by global rank 0.

        ``targets``: this sync's servers as ``(url, generation)`` pairs, the same on every rank
        (None: the last ones); a change rebuilds the weight-update group. Raises
        :class:`WeightSyncError` on every rank when the sync failed.

        Colocated mode: the servers' weight memory comes back first, their KV cache after the
        new weights are in (SGLang's documented order).
        """
        if targets is not None:
            targets = tuple((str(u), int(g)) for u, g in targets)
            if targets != self.targets:
                self.reset()
                self.targets = targets
                self.syncer = self._make_syncer([u for u, _ in targets])
        if self.colocated and self._lead:
            self.syncer.resume_memory(["weights"])
        if self.colocated:
            dist.barrier()
        try:
            return self._send(self.syncer, model, version)
        finally:
            if self.colocated and self._lead:
                self.syncer.resume_memory(["kv_cache", "cuda_graph"])

    def publish_once(self, model, version: int, urls: list[str]) -> float:
        """Sends the weights to ``urls`` only (restarted servers), in a weight-update group of
        their own that is closed afterwards; the servers in service are not paused. Collective;
        raises :class:`WeightSyncError` on every rank when it failed."""
        syncer = self._make_syncer(list(urls))
        try:
            return self._send(syncer, model, version)
        finally:
            if syncer is not None:
                try:
                    syncer.close()
                except Exception as e:  # noqa: BLE001 - e.g. the server died again
                    logger.warning("closing the weight-update group of %s: %s", urls, e)

    def _send(self, syncer: WeightSyncer | None, model, version: int) -> float:
        result = [0.0, None, False]  # GB/s, error, whether it only echoes another sender's
        named = export_hf(model, owned=True)
        if self.is_sender:
            try:
                result[0] = syncer.sync(named, version).gbps
            except Exception as e:  # noqa: BLE001 - every rank hears of it below
                result[1] = str(e) if isinstance(e, WeightSyncError) else f"{type(e).__name__}: {e}"
                result[2] = isinstance(e, PeerSyncError)
                # The TP peers are inside the export's per-tensor all-gathers: finish them.
                for _ in named:
                    pass
        else:
            for _ in named:  # TP peer: join the export's all-gathers (nothing for other replicas)
                pass
        results = [None] * dist.get_world_size()
        dist.all_gather_object(results, result)
        # Every rank raises the same message: the cause, from the sender where it happened.
        errors = sorted((echo, r, msg) for r, (_, msg, echo) in enumerate(results) if msg is not None)
        if errors:
            if self.syncer is syncer:
                self.reset()  # the group may be broken; the next publish rebuilds it
                self.targets = ()
            raise WeightSyncError(errors[0][2])
        return results[0][0]

    def reset(self) -> None:
        """Drops the weight-update group (e.g. after a server restart); the next publish rebuilds it."""
        if self.syncer is not None:
            try:
                self.syncer.close()
            except Exception as e:  # noqa: BLE001 - a dead or restarted server never knew it
                logger.info("closing the old weight-update group: %s", e)

    def close(self) -> None:
        if self.syncer is not None:
            self.syncer.close()
