"""Every supported dense family, synced from Megatron into a real SGLang server and proven.

One server per family (Llama untied, Llama tied, Qwen3 with QK-norm; Qwen2 with q/k/v biases is
test_e2e_megatron_sync's model): the proof after the sync compares the trainer's log-probs with
the server's, and a plain HF forward of the exported weights must agree with both.
"""

from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from sglang_servers import PROBE_IDS, hf_logprobs, make_family_model, sglang_manager, step_sync_and_prove

pytestmark = pytest.mark.slow

IDS = PROBE_IDS


def step_sync_prove(rank, world_size, model_dir, url):
    from maspo_megatron.megatron.convert import export_hf
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel

    out = step_sync_and_prove(model_dir, url, ParallelConfig(), version=1)
    exported = {k: v.clone() for k, v in export_hf(out["actor"].model)}
    destroy_parallel()
    return {"proof": out["proof"], "trained": out["trained"], "exported": exported}


@pytest.mark.parametrize("family", ["llama", "llama_tied", "qwen3"])
def test_family_synced_and_proven(tmp_path, family):
    model_dir = str(tmp_path / "model")
    model = make_family_model(model_dir, family)
    servers = sglang_manager(model_dir, 1, str(tmp_path))
    try:
        servers.start()
        (r0,) = run_distributed(step_sync_prove, 1, model_dir, servers.urls[0], timeout=300)
    finally:
        servers.stop()
    assert r0["proof"]["sync/proof_max_abs_diff"] < 1e-4
    # Independent check: HF transformers with the exported weights computes the same log-probs.
    model.load_state_dict(r0["exported"], strict=family != "llama_tied")
    torch.testing.assert_close(hf_logprobs(model, IDS), r0["trained"], atol=1e-4, rtol=0)
