"""Routing replay (R3) through the real CLI: ``maspo-megatron train --recipe tiny_cpu`` on a tiny
Qwen3-MoE with ``rollout.routing_replay=true`` (real SGLang CPU server started by the trainer
with ``--enable-return-routed-experts``; no sglang-router, which drops the request field),
torchrun at DP=2, weight sync and its
proof every step). Both steps must reach metrics.jsonl with a finite loss, and the routes must
have been used: the run's log says so per pass (the actor counts replayed micro-batches)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_moe_assets(out: str) -> dict[str, str]:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from maspo_megatron.data import SyntheticTaskConfig, make_demo_tokenizer, make_synthetic_dataset

    model_dir = os.path.join(out, "model")
    os.makedirs(model_dir)
    tok = make_demo_tokenizer(model_dir)
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                         max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    train, _ = make_synthetic_dataset(os.path.join(out, "data"), SyntheticTaskConfig(seed=0))
    return {"model": model_dir, "train": train}


@pytest.mark.sglang
def test_cli_trains_a_moe_with_routing_replay(tmp_path):
    assets = make_moe_assets(str(tmp_path / "assets"))
    out = str(tmp_path / "run")
    # TP=1 x DP=2: megatron refuses MoE with TP > 1 in training unless sequence parallelism is on.
    argv = ["train", "--recipe", "tiny_cpu", "--nproc-per-node", "2", "parallel.tp=1", f"model.path={assets['model']}",
            f"data.train_path={assets['train']}", f"output_dir={out}", "steps=2", "prompts_per_step=8",
            "eval_every=0", "rollout.routing_replay=true", "rollout.use_router=false",
            "tensorboard=false"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "maspo_megatron.cli", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 2, tail
    for row in rows:
        assert math.isfinite(row["actor/loss"]) and row["actor/replayed_micro_batches"] > 0, row
        print({k: row[k] for k in ("step", "actor/loss", "mismatch/logprob_abs_diff",
                                   "actor/replayed_micro_batches")}, file=sys.stderr)
