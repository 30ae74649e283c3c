"""Routing replay (R3): megatron's MoE routers use the rollout engine's experts per token.

A model built with ``TransformerConfig.moe_enable_routing_replay=True`` gives every
``TopKRouter`` a megatron-core ``RouterReplay`` (``transformer/moe/router_replay.py``). In
``REPLAY_FORWARD`` its top-k takes the indices it was given and gathers their scores (so the
gating weights keep their gradient); in ``REPLAY_BACKWARD`` it pops the oldest indices it was
given, which is what an activation-recompute forward inside backward needs, micro-batch by
micro-batch in forward order. Megatron itself never switches between the two: :class:`RoutingReplay`
does, per micro-batch, per pipeline stage and per model chunk (each holds the routers of its
layers; a router's ``layer_number`` is global and 1-based, so it picks its layer of the routes).
The switch to ``REPLAY_BACKWARD`` is an identity on the chunk's output (the loss on the last
stage), whose backward runs before anything upstream of it, recompute included.

Routes come as ``[n, L, layers, topk]`` per micro-batch, aligned with its ``[n, L]`` token ids
(``SequenceBatch.routed_experts``); every position holds ``topk`` distinct valid experts (tokens
the engine never forwarded, e.g. each response's last token and the padding, hold
:func:`filler_routes`: their outputs reach no log-prob). The router sees the tokens of
``[s, b, h]`` hidden states flattened sequence-major, so the routes are reordered the same way.
"""

from __future__ import annotations

import torch


def filler_routes(shape: tuple[int, ...], layers: int, topk: int) -> torch.Tensor:
    """Routes ``experts 0..topk-1`` for positions without a recorded route (``shape + (layers, topk)``)."""
    return torch.arange(topk, dtype=torch.int32).expand(*shape, layers, topk).clone()


def replay_routers(model_chunks) -> list[tuple[int, object]]:
    """``(0-based global layer, RouterReplay)`` of every replaying router of these chunks."""
    from megatron.core.transformer.moe.router import Router

    found = []
    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, Router) and getattr(module, "router_replay", None) is not None:
                found.append((module.layer_number - 1, module.router_replay))
    return found


class _EnterBackwardReplay(torch.autograd.Function):
    """Identity (a copy: megatron frees stage outputs and refuses views) whose backward switches
    a chunk's routers to ``REPLAY_BACKWARD`` before any recompute of the same micro-batch runs."""

    @staticmethod
    def forward(ctx, x, routers):
        ctx.routers = routers
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        for _, replay in ctx.routers:
            replay.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
        return grad, None


class RoutingReplay:
    """Feeds per-micro-batch routes to this rank's replaying routers."""

    def __init__(self, model_chunks, *, num_layers: int, topk: int, sequence_parallel: bool):
        from megatron.core import parallel_state as ps

        self.routers = replay_routers(model_chunks)
        # Per model chunk (as the schedule hands it to forward_step, wrappers included): with
        # virtual pipeline stages a forward must feed, and a backward switch, only its chunk's
        # routers, or the others' backward queues would get extra entries.
        self._by_chunk: dict[int, list] = {}
        self.num_layers, self.topk = num_layers, topk
        # Under sequence parallelism each TP rank's router sees its own contiguous share of the
        # sequence dimension (megatron's scatter_to_sequence_parallel_region splits dim 0 evenly).
        self.sp_rank, self.sp_size = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()) \
            if sequence_parallel else (0, 1)

    def check(self, routes: torch.Tensor | None, shape: tuple[int, int]) -> None:
        """Routes for a ``shape`` = ``[N, L]`` batch, or an error saying what is wrong."""
        want = (*shape, self.num_layers, self.topk)
        if routes is None:
            raise ValueError("routing replay is on (the model was built with moe_enable_routing_replay) "
                             "but the batch has no routed_experts: the rollout's routes did not reach "
                             "the actor (rollout.routing_replay must request them)")
        if tuple(routes.shape) != want:
            raise ValueError(f"routed_experts has shape {tuple(routes.shape)}, expected {want} "
                             "(sequences, tokens, layers, topk)")

    def _routers_of(self, chunk) -> list:
        key = id(chunk)
        if key not in self._by_chunk:
            self._by_chunk[key] = replay_routers([chunk])
        return self._by_chunk[key]

    def set_micro_batch(self, routes: torch.Tensor, chunk) -> None:
        """Routes ``[n, L, layers, topk]`` (or packed ``[1, T, ...]``) of ``chunk``'s next forward."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        seq = routes.transpose(0, 1)  # [L, n, ...]: the [s, b] order the router flattens
        if self.sp_size > 1:
            if seq.shape[0] % self.sp_size:
                raise ValueError(f"routing replay: {seq.shape[0]} tokens per sequence do not split over "
                                 f"{self.sp_size} sequence-parallel ranks")
            share = seq.shape[0] // self.sp_size
            seq = seq[self.sp_rank * share:(self.sp_rank + 1) * share]
        tokens = seq.reshape(-1, self.num_layers, self.topk)
        for layer, replay in self._routers_of(chunk):
            replay.set_target_indices(tokens[:, layer].to(torch.long))
            replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    def enter_backward(self, x: torch.Tensor, chunk) -> torch.Tensor:
        """``x`` (``chunk``'s output or loss) wrapped so its backward starts backward replay."""
        return _EnterBackwardReplay.apply(x, self._routers_of(chunk))

    def clear(self) -> None:
        """Forgets every route and action (after each pass: no route outlives its batch)."""
        for _, replay in self.routers:
            replay.clear_indices()
            replay.clear_router_replay_action()
