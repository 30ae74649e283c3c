"""MASPO on Qwen3-235B-A22B (mixture of experts: 128 experts, 8 active), math RL.

Beyond the paper: MASPO was evaluated on dense 1.5B/7B/14B models only; this recipe applies the
same hyper-parameters (``recipes/_maspo_math.py``: [M] MASPO, [D] DAPO, [R] ours) to an MoE.

Model: ``Qwen3MoeForCausalLM`` (94 layers, hidden 4096, 64 query / 4 KV heads of 128, every layer
an MoE of 128 SwiGLU experts of width 1536, top-8 with renormalised probabilities, no shared
experts; 235B parameters, 22B active per token; 40960-token context).

Layout [R], for 8x H100 80GB nodes (``maspo-megatron plan --recipe maspo_qwen3_235b_a22b``):
- training: 16 nodes, TP4 x PP2 x EP8 with expert TP 4 (``parallel.etp`` None follows TP),
  sequence parallelism and full recompute; DP 16, expert DP 2.
  - PP2: 94 layers divide only into 2 (or 47) stages. PP4/PP8 with uneven first/last stages
    (megatron's ``num_layers_in_first_pipeline_stage``/``..._last_...``) or virtual pipeline
    stages (branch ``vpp``) would shorten the pipeline bubble per stage, but this project's
    model build requires ``num_hidden_layers % pp == 0`` and has no such keys yet.
  - experts: 97% of the parameters. At PP2 x EP8 a GPU holds 47 layers x 16 experts; expert TP 4
    splits those 1536-wide experts into 384-wide shards (3.5B expert parameters per GPU), and
    16 nodes give expert DP 2 to shard their optimizer state. The plan: 57.8 of 80 GiB on the
    last stage (expert optimizer state 19.8 GiB the largest term). Expert TP 1 would put 14.2B
    expert parameters on a GPU (116 GiB); 8 nodes (expert DP 1) plan at 78.4 GiB, no headroom
    for skewed routing. EP16 (expert DP 1) halves the experts per GPU but doubles the
    all-to-all group.
  - TP4: one KV head per TP rank (4 KV heads).
- rollouts: 8 nodes, one SGLang server at TP8 per node (54.9 GiB of bf16 weights per GPU; SGLang
  replicates the 4 KV heads to 8): 73.0 of 80 GiB. 4 nodes would put 16 requests of 22.5k tokens
  on a server, whose KV cache no longer fits next to the weights (81.1 GiB).

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

Not done: uneven or virtual pipeline stages for this recipe (see PP above).

    python -m launch.slurm --recipe maspo_qwen3_235b_a22b --train-nodes 16 --rollout-nodes 8 ... \
        model.path=/models/Qwen3-235B-A22B data.train_path=/data/train.parquet
"""

from _maspo_math import maspo_math_config

from maspo_megatron.runtime import ParallelConfig
from maspo_megatron.trainer import ModelConfig, TrainerConfig

TRAIN_NODES, ROLLOUT_NODES, GPUS_PER_NODE = 16, 8, 8  # intended layout (tests check it)

# Qwen/Qwen3-235B-A22B config.json, architecture fields. The toy-scale CI run
# (maspo_megatron/toy.py) builds a tiny Qwen3-MoE from it (4 experts, top-2, same routing rules).
HF_CONFIG = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=4096, intermediate_size=12288,
    moe_intermediate_size=1536, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001, output_router_logits=False,
    num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128, vocab_size=151936,
    max_position_embeddings=40960, max_window_layers=94, rope_theta=1000000.0, rope_scaling=None,
    rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False, attention_bias=False,
    use_sliding_window=False, sliding_window=None,
)


def build() -> TrainerConfig:
    return maspo_math_config(
        model=ModelConfig(dtype="bf16", sequence_parallel=True, recompute_granularity="full"),
        parallel=ParallelConfig(tp=4, pp=2, ep=8),
        sglang_tp=8,
        routing_replay=True,
        output_dir="outputs/maspo_qwen3_235b_a22b",
        steps=200,
    )
