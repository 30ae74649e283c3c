"""Full activation recompute (the cluster recipes' ``recompute_granularity="full"``) on CPU:
megatron re-runs each layer's forward inside autograd's backward, where the CPU mode's device
redirection must still apply; the gradients equal those without recompute."""

from __future__ import annotations

import pytest
import torch

from distributed import run_distributed


def grads_with_and_without_recompute(rank, world_size, model_dir, tp):
    from maspo_megatron.megatron.convert import load_hf_checkpoint
    from maspo_megatron.megatron.model import build_model
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel, initialize_parallel

    parallel = ParallelConfig(tp=tp)
    initialize_parallel(parallel)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, overrides in (("plain", {}), ("full", dict(recompute_granularity="full",
                                                         recompute_method="uniform", recompute_num_layers=1))):
        (model,) = build_model(model_dir, parallel, dtype=torch.float32, config_overrides=overrides)
        load_hf_checkpoint([model], model_dir)
        logits = model(ids, torch.arange(12).expand_as(ids), None)
        (logits.float() ** 2).mean().backward()
        out[name] = {k: p.grad.clone() for k, p in model.named_parameters()}
    destroy_parallel()
    return out


@pytest.mark.slow
def test_full_recompute_runs_on_cpu_and_gives_the_same_gradients(tmp_path):
    from test_megatron_actor import make_tiny_llama

    make_tiny_llama(tmp_path)
    for r in run_distributed(grads_with_and_without_recompute, 2, str(tmp_path), 2):
        assert r["plain"].keys() == r["full"].keys()
        for k, g in r["plain"].items():
            torch.testing.assert_close(r["full"][k], g, atol=1e-6, rtol=0, msg=k)
