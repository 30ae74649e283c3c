"""MASPO on Qwen3-30B-A3B (mixture of experts: 128 experts, 8 active), math RL.

Beyond the paper: MASPO was evaluated on dense 1.5B/7B/14B models only; this recipe applies the
same hyper-parameters (``recipes/_maspo_math.py``: [M] MASPO, [D] DAPO, [R] ours) to an MoE.

Model: ``Qwen3MoeForCausalLM`` (48 layers, hidden 2048, 32 query / 4 KV heads of 128, every layer
an MoE of 128 SwiGLU experts of width 768, top-8 with renormalised probabilities, no shared
experts; 30.5B parameters, 3.3B active per token). Qwen3-30B-A3B's context is 40960 tokens, more
than the 2048 + 20480 used here.

Layout [R], for 8x H100 80GB nodes (``maspo-megatron plan --recipe maspo_qwen3_30b_a3b``):
- training: 2 nodes, TP2 x PP1 x EP8 with expert TP 2 (``parallel.etp`` None follows TP),
  sequence parallelism (megatron's MoE layer refuses TP > 1 without it) and full recompute;
  DP 8, expert DP 1. The experts are 95% of the parameters, so EP and expert TP decide the
  memory: EP8 puts 16 experts per layer on a GPU, expert TP 2 halves each (1.8B expert
  parameters per GPU), and TP2 halves the attention/embedding shards and the 22.5k-token
  activations and logits. The plan: 50.1 of 80 GiB per GPU (expert optimizer state 20.3 GiB,
  unsharded at expert DP 1, the largest term). The EP all-to-all spans the two nodes (EP8 x
  ETP2 over 16 ranks). Expert TP 1 (whole 768-wide expert GEMMs, no TP collective inside the
  expert layer; 59.9 GiB) would be the faster choice, but this project's weight sync refuses
  ``parallel.etp != parallel.tp`` with EP. One node does not fit: TP2 leaves DP4, too few for
  EP8, and TP1 x EP8 needs 95.5 GiB (40.5 GiB of expert optimizer state, 12.8 GiB of logits).
- rollouts: 1 node, 4 SGLang servers at TP2 (28 GiB of bf16 weights per GPU; SGLang splits every
  expert over its TP ranks).
- PP1: 48 layers would also split into PP2/PP4 stages, not needed at this size.

MoE settings (``families/moe.py``): megatron's dropless alltoall dispatcher, softmax router
in fp32 with top-k renormalisation (the checkpoint's ``norm_topk_prob``), load-balancing aux loss
at the checkpoint's ``router_aux_loss_coef`` 0.001 (``model.moe_aux_loss_coeff`` None keeps it).
MASPO's sources say nothing about MoE; slime's Qwen3-MoE model scripts (``scripts/models/``)
use 0: an option, not the default here.

Routing replay is on (``rollout.routing_replay``): SGLang returns each token's routed experts
and the trainer's routers replay them in the old-log-prob and train passes. Without it the
trainer's router may pick other experts than SGLang's did for the same token, which shows up
as importance-ratio noise MASPO's trust region has to absorb (README, Routing replay). The
client then spreads requests over the servers itself (``rollout.use_router=false``):
sglang-router 0.3.2 drops the routed-experts request field.

    python -m launch.slurm --recipe maspo_qwen3_30b_a3b --train-nodes 2 --rollout-nodes 1 ... \
        model.path=/models/Qwen3-30B-A3B data.train_path=/data/train.parquet
"""

from _maspo_math import maspo_math_config

from maspo_megatron.runtime import ParallelConfig
from maspo_megatron.trainer import ModelConfig, TrainerConfig

TRAIN_NODES, ROLLOUT_NODES, GPUS_PER_NODE = 2, 1, 8  # intended layout (tests check it)

# Qwen/Qwen3-30B-A3B config.json, architecture fields. The toy-scale CI run
# (maspo_megatron/toy.py) builds a tiny Qwen3-MoE from it (4 experts, top-2, same routing rules).
HF_CONFIG = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
    moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001, output_router_logits=False,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
    max_position_embeddings=40960, max_window_layers=48, rope_theta=1000000.0, rope_scaling=None,
    rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False, attention_bias=False,
    use_sliding_window=False, sliding_window=None,
)


def build() -> TrainerConfig:
    return maspo_math_config(
        model=ModelConfig(dtype="bf16", sequence_parallel=True, recompute_granularity="full"),
        parallel=ParallelConfig(tp=2, pp=1, ep=8),
        sglang_tp=2,
        routing_replay=True,
        output_dir="outputs/maspo_qwen3_30b_a3b",
    )
