"""Real SGLang 0.5.23 servers (its CPU engine) for the tests: tiny HF models and server managers.

Each server is the real ``sglang.launch_server`` process tree, started exactly as the trainer
starts it (``rollout/sglang/server.py``), so these tests speak to what users run.
"""

from __future__ import annotations

import torch

from maspo_megatron.rollout.backend import ServerSpec, get_backend
from maspo_megatron.rollout.servers import ServerManager

STARTUP_TIMEOUT_S = 300  # 16-60 s when idle; far more while other tests load the 2 cores


def sglang_manager(model_dir: str, n: int, log_dir: str, **spec_fields) -> ServerManager:
    spec = ServerSpec(model_path=model_dir, device="cpu", **spec_fields)
    backend = get_backend("sglang")
    return ServerManager(lambda port, host: backend.server_command(spec, port, host), n,
                         startup_timeout_s=STARTUP_TIMEOUT_S, log_dir=log_dir)


def make_family_model(path: str, family: str, seed: int = 0, vocab: int = 64, layers: int = 2):
    """A random tiny HF model of ``family``: llama (untied), llama_tied, qwen2 (q/k/v biases),
    qwen3 (QK-norm), qwen3_moe (4 experts, top-2). Larger-than-default weights make outputs peaked and distinguishable."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=0, eos_token_id=1)
    if family in ("llama", "llama_tied"):
        cfg, cls = tf.LlamaConfig(**common, tie_word_embeddings=family == "llama_tied"), tf.LlamaForCausalLM
    elif family == "qwen2":
        cfg, cls = tf.Qwen2Config(**common, tie_word_embeddings=False), tf.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg, cls = tf.Qwen3Config(**common, head_dim=8, tie_word_embeddings=False), tf.Qwen3ForCausalLM
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, head_dim=8, moe_intermediate_size=32, num_experts=4,
                                num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False)
        cls = tf.Qwen3MoeForCausalLM
    else:
        raise ValueError(family)
    model = cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
            elif "bias" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    return model


def hf_logprobs(model, ids, temperature: float = 1.0) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 from an HF forward (the independent reference)."""
    x = torch.tensor([list(ids)])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0].float() / temperature
    return torch.log_softmax(logits[:-1], -1).gather(1, x[0, 1:, None])[:, 0]


PROBE_IDS = [3, 17, 9, 42, 5, 11, 30, 2, 57, 8]


def step_sync_and_prove(model_dir: str, url: str, parallel, version: int,
                        bucket_bytes: int = 16 << 10) -> dict:
    """Inside a ``run_distributed`` worker: builds the model of ``model_dir`` at ``parallel``,
    trains one MASPO step on :data:`PROBE_IDS`, syncs it into the server at ``url`` and proves
    it. Returns ``actor``, the step's ``metrics``, the ``proof`` result and the ``trained``
    model's log-probs of ``PROBE_IDS[1:]`` (temperature 1, to hold against the server or HF), and
    this rank's ``sync_stats`` (None on ranks that send nothing).
    The caller tears the parallel state down."""
    from maspo_megatron.algo.objective import Objective
    from maspo_megatron.megatron.actor import Actor, ActorConfig, OptimizerConfig, SequenceBatch
    from maspo_megatron.megatron.convert import load_hf_checkpoint
    from maspo_megatron.megatron.model import build_model
    from maspo_megatron.rollout.client import RolloutClient
    from maspo_megatron.rollout.weight_sync import ProofConfig, WeightSyncConfig
    from maspo_megatron.runtime import initialize_parallel
    from maspo_megatron.weight_publisher import WeightProof, WeightPublisher

    initialize_parallel(parallel)
    chunks = build_model(model_dir, parallel, dtype=torch.float32, make_vocab_size_divisible_by=8)
    load_hf_checkpoint(chunks, model_dir)
    cfg = ActorConfig(optimizer=OptimizerConfig(lr=3e-2))
    actor = Actor(chunks, cfg, objective=Objective(cfg))
    ids = torch.tensor([PROBE_IDS] * 2)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 4:] = True
    batch = SequenceBatch(input_ids=ids, lengths=torch.full((2,), ids.shape[1]), response_mask=mask,
                          advantages=torch.tensor([1.0, -1.0]))
    batch.old_logprobs, _ = actor.compute_logprobs(batch)
    metrics = actor.train_step(batch)
    publisher = WeightPublisher([url], WeightSyncConfig(bucket_bytes=bucket_bytes))
    publisher.publish(actor.model, version=version)
    proof = WeightProof(ProofConfig(), actor.spec.vocab_size, actor.dp_size, atol=1e-4)
    result = proof.check(actor, RolloutClient([url]), [url], version)
    stats = publisher.syncer.last_stats if publisher.syncer is not None else None
    publisher.close()
    every = torch.ones_like(mask)
    every[:, 0] = False  # every token but the first, which nothing predicts
    trained, _ = actor.compute_logprobs(
        SequenceBatch(input_ids=ids, lengths=batch.lengths, response_mask=every), temperature=1.0)
    return {"actor": actor, "metrics": metrics, "proof": result, "trained": trained[0, 1:],
            "sync_stats": stats}
