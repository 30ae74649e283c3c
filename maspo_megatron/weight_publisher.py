"""Megatron weights -> rollout servers, every step, without gathering the model on one rank.

One sender per pipeline stage: TP rank 0 of the first data-parallel replica streams its stage's
HF-named tensors (``megatron.convert.export_hf``) into the servers' weight-update group; its TP
peers take part in the per-tensor TP all-gathers of the export; other data-parallel replicas
hold the same weights and do nothing. Stages take turns (SGLang handles one update call at a
time). Collective over all ranks.
"""

from __future__ import annotations

import logging

import torch.distributed as dist

from maspo_megatron.megatron.convert import export_hf
from maspo_megatron.rollout.weight_sync import WeightSyncConfig, WeightSyncer, make_turn_barrier

logger = logging.getLogger(__name__)


class WeightPublisher:
    def __init__(self, server_urls: list[str], cfg: WeightSyncConfig, *, engine_ranks_per_server: int = 1):
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
            self.syncer = WeightSyncer(server_urls, cfg, engine_ranks_per_server=engine_ranks_per_server,
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
