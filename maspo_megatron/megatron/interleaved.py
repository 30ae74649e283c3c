"""What the actor needs to run megatron-core's interleaved 1F1B schedule (virtual pipeline stages).

- Micro-batch counts: the schedule needs at least ``pp`` micro-batches and a
  ``microbatch_group_size_per_vp_stage`` in ``[pp, M]`` whose remainder ``M % group`` is 0 or at
  least ``pp`` (``schedules.forward_backward_pipelining_with_interleaving``). The actor packs
  micro-batches by a token budget, so ``M`` varies from step to step: :func:`split_to_count`
  reaches ``pp`` and :func:`interleave_group_size` picks the group for each run.
- Point-to-point settings. At ``pp == 2`` a rank's previous and next stage are the same rank,
  so activations going forward and gradients going backward travel between the same two ranks.
  Found on CPU/gloo with megatron-core 0.19: with its default ``batch_p2p_comm=True`` the
  interleaved steady state (one batched call for both directions, posted send-prev, recv-prev,
  send-next, recv-next on both ranks) matches rank 0's gradient with rank 1's activation
  receive -- a PP=2 x VPP=2 step trained on swapped tensors (loss -0.517 instead of PP=1's
  -0.509) and swapped shapes failed the log-prob shape check; unbatched but not overlapped, a
  step with as many micro-batches as stages hung in the shape exchange. Megatron-LM's own
  setting for the interleaved schedule (``overlap_p2p_comm=True``, hence unbatched; it posts
  each direction in calls of its own) matched PP=1 in every case tried, so
  :func:`use_interleaved_p2p` sets it.
"""

from __future__ import annotations

import torch


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


def use_interleaved_p2p(config) -> None:
    """Megatron-LM's point-to-point settings for the interleaved schedule (module docstring)."""
    config.batch_p2p_comm = False
    config.overlap_p2p_comm = True
