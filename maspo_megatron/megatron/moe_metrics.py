"""Per-step metrics of mixture-of-experts layers: expert load per layer and the load-balancing loss.

- ``moe/load_imbalance/layer_<i>``: max over experts of the tokens routed to an expert, divided
  by their mean (1 = perfectly balanced, ``E / topk`` = every token on the same ``topk``
  experts), counted over every token of the step's mini-batch on all data-parallel ranks, for
  global layer ``i``; ``moe/load_imbalance_worst`` is the largest over layers. Padding tokens of
  a micro-batch are routed like others and counted.
- ``moe/aux_loss``: the load-balancing term megatron's router adds to the objective (its
  ``aux_loss`` times ``moe_aux_loss_coeff``, summed over layers), averaged over micro-batches
  and data-parallel ranks, from megatron's MoE metrics tracker (recorded only while training
  with a coefficient > 0).

Every rank gets the same values (summed over the pipeline, data-parallel and, with sequence
parallelism, tensor-parallel groups).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from maspo_megatron.megatron.model import global_layer_indices, model_spec, unwrap_model
from maspo_megatron.runtime import device

_TRACKER_NAME = "load_balancing_loss"


class MoeMetrics:
    """Counts routed tokens per (layer, expert) through forward hooks on the routers."""

    def __init__(self, model_chunks: list):
        spec = model_spec(model_chunks[0])
        self.moe = spec.arch.moe
        self.num_layers = spec.arch.num_layers
        self.coeff = float(spec.transformer_config.moe_aux_loss_coeff or 0.0)
        self.sequence_parallel = spec.transformer_config.sequence_parallel
        self.counting = False
        self.counts = torch.zeros(self.num_layers, self.moe.num_experts, dtype=torch.float64)
        for chunk in model_chunks:
            model = unwrap_model(chunk)
            for layer, index in zip(model.decoder.layers, global_layer_indices(model)):
                layer.mlp.router.register_forward_hook(self._hook(index))

    def _hook(self, index: int):
        def count(module, args, output):
            if self.counting:
                _, routing_map = output
                self.counts[index] += routing_map.detach().sum(dim=0).double().cpu()
        return count

    def start(self) -> None:
        """Begins a mini-batch: zeroes the counts and megatron's tracker."""
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        self.counts.zero_()
        get_moe_metrics_tracker().clear()
        self.counting = True

    def finish(self, num_micro_batches: int) -> dict[str, float]:
        """Collective over all ranks: the mini-batch's metrics (module docstring)."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        self.counting = False
        entry = get_moe_metrics_tracker().metrics.get(_TRACKER_NAME)
        aux = torch.zeros(self.num_layers, dtype=torch.float64)
        if entry is not None:
            # Summed over this rank's micro-batches, which megatron averages (each rank its own).
            aux += entry.values.detach().double().cpu() / num_micro_batches
            if entry.reduce_group is not None:  # each TP rank holds a 1/TP share (router.py)
                aux = _all_reduce(aux, entry.reduce_group)
        counts = self.counts.clone()
        groups = [ps.get_data_parallel_group()]
        if self.sequence_parallel:  # TP ranks routed different tokens
            groups.append(ps.get_tensor_model_parallel_group())
        for group in groups:
            counts = _all_reduce(counts, group)
        aux = _all_reduce(aux, ps.get_data_parallel_group())
        both = _all_reduce(torch.cat([counts.flatten(), aux]), ps.get_pipeline_model_parallel_group())
        counts, aux = both[:-self.num_layers].view_as(self.counts), both[-self.num_layers:]
        imbalance = counts.max(dim=1).values / counts.mean(dim=1).clamp_min(1e-12)
        out = {f"moe/load_imbalance/layer_{i}": float(v) for i, v in enumerate(imbalance)}
        out["moe/load_imbalance_worst"] = float(imbalance.max())
        out["moe/aux_loss"] = self.coeff * float(aux.sum()) / ps.get_data_parallel_world_size()
        return out


def _all_reduce(values: torch.Tensor, group) -> torch.Tensor:
    if dist.get_world_size(group) == 1:
        return values
    buf = values.to(device())
    dist.all_reduce(buf, group=group)
    return buf.cpu()
