"""What the actor needs to run megatron-core's interleaved 1F1B schedule (virtual pipeline stages).

- Micro-batch counts: the schedule needs at least ``pp`` micro-batches and a
  ``microbatch_group_size_per_vp_stage`` in ``[pp, M]`` whose remainder ``M % group`` is 0 or at
  least ``pp`` (``schedules.forward_backward_pipelining_with_interleaving``). The actor packs
  micro-batches by a token budget, so ``M`` varies from step to step: :func:`split_to_count`
  reaches ``pp`` and :func:`interleave_group_size` picks the group for each run.
- Point-to-point order at ``pp == 2``. There a rank's previous and next stage are the same
  rank, so an activation going forward and a gradient going backward travel between the same
  two ranks in the same call of the interleaved steady state. megatron-core 0.19's batched
  exchanges (``_batched_p2p_ops``, and ``_communicate_shapes``, which the actor's variable
  micro-batch shapes use) post them as send-prev, recv-prev, send-next, recv-next on both ranks,
  so rank 0's gradient is matched with rank 1's activation receive: the schedule silently
  trains on swapped tensors (found on CPU/gloo: the loss of a PP=2 x VPP=2 step differed from
  PP=1, and swapped shapes failed the fused log-prob shape check). Its unbatched ``_p2p_ops``
  orders sends and receives per rank parity and keeps the two directions on different groups
  when ``pp == 2`` -- the path Megatron-LM itself takes for the interleaved schedule (its
  ``overlap_p2p_comm`` default). :func:`schedule_kwargs` makes both the tensors
  (``batch_p2p_comm=False``) and their shapes go that way.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import p2p_communication, schedules


def split_to_count(micro: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """Halves the micro-batches (row indices) with the most rows until there are ``count``.

    The interleaved schedule needs at least one micro-batch per pipeline stage; smaller
    micro-batches only use less of the token budget.
    """
    micro = list(micro)
    while len(micro) < count:
        i = max(range(len(micro)), key=lambda j: len(micro[j]))
        if len(micro[i]) < 2:
            raise ValueError(
                f"this data-parallel rank got {sum(len(m) for m in micro)} sequences of a mini-batch, "
                f"fewer than parallel.pp={count}: the interleaved schedule (parallel.vpp) needs at least "
                "one micro-batch per pipeline stage; train on more sequences per step, or lower "
                "actor.num_mini_batches or the data-parallel size")
        micro[i:i + 1] = list(micro[i].tensor_split(2))
    return micro


def interleave_group_size(num_micro: int, pp: int) -> int:
    """``microbatch_group_size_per_vp_stage`` for ``num_micro`` micro-batches: the smallest
    group of at least ``pp`` whose remainder is 0 or at least ``pp`` (``pp`` itself whenever it
    divides ``num_micro``: the schedule's default and its smallest pipeline bubble)."""
    if num_micro < pp:
        raise ValueError(f"{num_micro} micro-batches cannot fill {pp} pipeline stages")
    return next(g for g in range(pp, num_micro + 1) if num_micro % g == 0 or num_micro % g >= pp)


def schedule_kwargs(config) -> dict:
    """Extra arguments of the interleaved ``forward_backward_func`` (module docstring): a
    communicator that exchanges shapes in megatron's unbatched order, with the default groups
    (the schedule takes a communicator only together with them). Sets
    ``config.batch_p2p_comm = False`` for the tensors themselves."""
    config.batch_p2p_comm = False
    communicator = UnbatchedShapeCommunicator(pp_group=parallel_state.get_pipeline_model_parallel_group(),
                                              config=config)
    return dict(p2p_communicator=communicator, pg_collection=schedules._build_default_pg_collection())


class UnbatchedShapeCommunicator(p2p_communication.P2PCommunicator):
    """megatron's communicator, exchanging shapes through its unbatched ``_p2p_ops``."""

    def _communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
        dev = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"

        def shape_of(t):
            return None if t is None else torch.tensor(t.size(), device=dev, dtype=torch.int64)

        def buffer(wanted):
            return torch.empty((3,), device=dev, dtype=torch.int64) if wanted else None

        recv_prev_shape, recv_next_shape = buffer(recv_prev), buffer(recv_next)
        reqs = p2p_communication._p2p_ops(
            tensor_send_prev=shape_of(tensor_send_prev), tensor_recv_prev=recv_prev_shape,
            tensor_send_next=shape_of(tensor_send_next), tensor_recv_next=recv_next_shape,
            group=self.pp_group, prev_pipeline_rank=self.prev_rank, next_pipeline_rank=self.next_rank,
        )
        for req in reqs.values():
            req.wait()
        return ([0, 0, 0] if recv_prev_shape is None else recv_prev_shape.tolist(),
                [0, 0, 0] if recv_next_shape is None else recv_next_shape.tolist())
