"""Qwen3-MoE at EP=2 and PP=2 x EP=2: a MASPO step, the weight sync into a real SGLang server
(each expert-parallel rank of each stage sends its own experts), the proof, and the trained
model's HF export. One server serves both layouts (synced to version 1, then 2).

The proof (``WeightProof``) compares the trainer's log-probs of a probe with the server's after
the sync; the exported checkpoint (``save_hf``) must load in HF transformers and give the
trainer's log-probs.
"""

from __future__ import annotations

import re

import pytest
import torch

from distributed import run_distributed
from sglang_servers import PROBE_IDS, hf_logprobs, make_family_model, sglang_manager, step_sync_and_prove

pytestmark = pytest.mark.slow

IDS = PROBE_IDS


LAYOUTS = {"ep2": (1, 2), "pp2ep2": (2, 4)}  # name -> (pp, world size); EP=2 in both


def step_sync_prove_export(rank, world_size, model_dir, url, out_dir, pp, version):
    from megatron.core import parallel_state as ps

    from maspo_megatron.megatron.convert import export_hf, save_hf
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel

    out = step_sync_and_prove(model_dir, url, ParallelConfig(pp=pp, ep=2), version)
    actor = out["actor"]
    # What this rank sends (the publisher's own export): its experts only.
    sent = [name for name, _ in export_hf(actor.model, owned=True)]
    save_hf(actor.model, out_dir, tokenizer_dir=model_dir)
    stage = ps.get_pipeline_model_parallel_rank()
    destroy_parallel()
    return {"proof": out["proof"], "trained": out["trained"], "sent": sent, "metrics": out["metrics"],
            "stage": stage}


def test_qwen3_moe_ep2_and_pp2ep2_synced_proven_and_exported(tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = str(tmp_path / "model")
    make_family_model(model_dir, "qwen3_moe")
    servers = sglang_manager(model_dir, 1, str(tmp_path))
    runs = {}
    try:
        servers.start()
        for version, (name, (pp, world)) in enumerate(LAYOUTS.items(), start=1):
            runs[name] = run_distributed(step_sync_prove_export, world, model_dir, servers.urls[0],
                                         str(tmp_path / f"exported_{name}"), pp, version, timeout=600)
    finally:
        servers.stop()
    initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for name, results in runs.items():
        r0 = results[0]
        print(name, "proof", r0["proof"], "aux", r0["metrics"]["moe/aux_loss"])
        assert r0["proof"]["sync/proof_max_abs_diff"] < 1e-4, name
        # Per stage, the first sender sends the dense tensors and experts 0-1, the second 2-3:
        # no rank sends (or holds) all experts.
        for stage in sorted({r["stage"] for r in results}):
            ranks = [r for r in results if r["stage"] == stage]
            experts = [{int(m) for n in r["sent"] for m in re.findall(r"\.experts\.(\d+)\.", n)} for r in ranks]
            assert experts == [{0, 1}, {2, 3}], (name, stage, experts)
            assert any("self_attn" in n for n in ranks[0]["sent"]) and not any("self_attn" in n for n in ranks[1]["sent"])
        trained = [r["trained"] for r in results]
        for other in trained[1:]:
            torch.testing.assert_close(other, trained[0])
        # The trained model, exported: HF transformers loads it and computes the trainer's log-probs.
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / f"exported_{name}", dtype=torch.float32).eval()
        gap = (hf_logprobs(hf, IDS) - trained[0]).abs().max().item()
        moved = (hf_logprobs(initial, IDS) - trained[0]).abs().max().item()
        print(f"{name}: exported HF vs trainer {gap:.2e}; initial vs trained {moved:.2e}")
        assert gap < 1e-4, name
        assert moved > 1e-3  # the step changed the model: the comparison is not of untouched weights
