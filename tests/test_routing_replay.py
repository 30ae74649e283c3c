"""Routing replay (R3), trainer side: megatron's routers take the given experts per token, in the
actor's log-prob and train passes, per micro-batch, per pipeline stage, through recompute.

The model is a tiny megatron-core MoE GPTModel (local spec, 4 experts, top-2) built here, with
``moe_enable_routing_replay``. References:
- megatron's own routing (``RouterReplayAction.RECORD`` over one plain forward of the whole
  batch): replaying it gives the log-probs and gradients of no replay, bit for bit, although the
  actor cuts the batch into other micro-batches with other padding;
- other routes (random distinct experts) change the log-probs, and give the same log-probs and
  train step on PP=2 with full recompute and several micro-batches as on one process.
"""

from __future__ import annotations

import types

import pytest
import torch

from distributed import run_distributed

VOCAB, HIDDEN, LAYERS, EXPERTS, TOPK, N, L = 64, 32, 4, 4, 2, 6, 10


def build_moe(tp: int, pp: int, *, replay: bool, recompute: bool = False, initialize: bool = True):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from maspo_megatron.runtime import ParallelConfig, initialize_parallel
    from megatron_tiny import full_tensor, local_view, sharded_tensors

    if initialize:
        initialize_parallel(ParallelConfig(tp=tp, pp=pp))
    extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
        if recompute else {}
    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=64,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, hidden_dropout=0.0,
        attention_dropout=0.0, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        use_cpu_initialization=True, bias_activation_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_ffn_hidden_size=32,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="allgather",
        moe_enable_routing_replay=replay, add_bias_linear=False, **extra,
    )
    model = GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(num_experts=EXPERTS),
        vocab_size=VOCAB, max_sequence_length=64, pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(), share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    with torch.no_grad():
        for sh in sharded_tensors(model):
            full = full_tensor(sh.key, sh.global_shape)
            sh.data.copy_(full[local_view(sh)].reshape(sh.data.shape))
    # What the actor reads of a model built by maspo_megatron.megatron.model.build_model.
    # (arch.moe=None: no family built it, so the actor's per-family MoE metrics stay off.)
    model.maspo_spec = types.SimpleNamespace(transformer_config=config, use_te=False, vocab_size=VOCAB,
                                             arch=types.SimpleNamespace(moe=None))
    return model


def make_batch(routes=None):
    from maspo_megatron.megatron.actor import SequenceBatch

    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([10, 7, 9, 4, 8, 6])
    ids = torch.randint(0, VOCAB, (N, L), generator=g)
    pos = torch.arange(L)[None]
    mask = (pos >= 2) & (pos < lengths[:, None])
    return SequenceBatch(input_ids=ids, lengths=lengths, response_mask=mask,
                         advantages=torch.randn(N, generator=g), routed_experts=routes)


def random_routes(seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, L, LAYERS, EXPERTS, generator=g).argsort(-1)[..., :TOPK].to(torch.int32)


def record_natural_routes(model) -> torch.Tensor:
    """megatron's own top-k of every token, one plain forward of the whole padded batch."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from maspo_megatron.megatron.routing_replay import replay_routers

    routers = replay_routers([model])
    for _, r in routers:
        r.set_router_replay_action(RouterReplayAction.RECORD)
    ids = make_batch().input_ids
    with torch.no_grad():
        model(ids, torch.arange(L).expand(N, L), None)
    routes = torch.zeros(N, L, LAYERS, TOPK, dtype=torch.int32)
    for layer, r in routers:  # recorded sequence-major: [L * N, topk]
        routes[:, :, layer] = r.get_recorded_indices().reshape(L, N, TOPK).transpose(0, 1).to(torch.int32)
        r.clear_indices()
        r.clear_router_replay_action()
    return routes


def _actor(model, recompute=False):
    from maspo_megatron.algo.objective import Objective
    from maspo_megatron.megatron.actor import Actor, ActorConfig, OptimizerConfig

    cfg = ActorConfig(loss="maspo", micro_batch_tokens=24, optimizer=OptimizerConfig(lr=1e-3, clip_grad=0.0))
    return Actor([model], cfg, objective=Objective(cfg))


def natural_vs_replayed(rank, world_size):
    from megatron_tiny import gather_params

    plain = build_moe(1, 1, replay=False)
    replayed = build_moe(1, 1, replay=True, initialize=False)
    routes = record_natural_routes(replayed)
    out = {}
    for name, model, r in (("plain", plain, None), ("replayed", replayed, routes)):
        actor = _actor(model)
        batch = make_batch(r)
        batch.old_logprobs, _ = actor.compute_logprobs(batch)
        metrics = actor.train_step(batch)
        out[name] = dict(lp=batch.old_logprobs, loss=metrics["loss"], grad_norm=metrics["grad_norm"],
                         params={k[0]: v[2] for k, v in gather_params(model).items()})
    other = make_batch(random_routes())
    out["other_lp"] = _actor(build_moe(1, 1, replay=True, initialize=False), False).compute_logprobs(other)[0]
    missing = _actor(build_moe(1, 1, replay=True, initialize=False))
    try:
        missing.compute_logprobs(make_batch())
    except ValueError as e:
        out["missing"] = str(e)
    return out


def test_replaying_megatrons_own_routes_changes_nothing():
    out = run_distributed(natural_vs_replayed, 1)[0]
    plain, rep = out["plain"], out["replayed"]
    mask = make_batch().response_mask
    assert torch.equal(plain["lp"], rep["lp"])
    assert plain["loss"] == rep["loss"] and plain["grad_norm"] == rep["grad_norm"]
    for k, v in plain["params"].items():
        assert torch.equal(v, rep["params"][k]), k
    # Other routes do reach the routers: the log-probs move.
    assert (out["other_lp"] - plain["lp"])[mask].abs().max() > 1e-3
    assert "routed_experts" in out["missing"]


def layout_run(rank, world_size, pp, recompute):
    from megatron_tiny import gather_params

    model = build_moe(1, pp, replay=True, recompute=recompute)
    actor = _actor(model)
    batch = make_batch(random_routes())
    batch.old_logprobs, _ = actor.compute_logprobs(batch)
    metrics = actor.train_step(batch)
    after, _ = actor.compute_logprobs(batch)
    return dict(lp=batch.old_logprobs, after=after, loss=metrics["loss"],
                params={k[0]: v[2] for k, v in gather_params(model).items()})


def test_replay_on_two_pipeline_stages_with_recompute_equals_one_process():
    one = run_distributed(layout_run, 1, 1, False)[0]
    two = run_distributed(layout_run, 2, 2, True)
    mask = make_batch().response_mask
    for r in two:
        torch.testing.assert_close(r["lp"][mask], one["lp"][mask], rtol=0, atol=1e-5)
        torch.testing.assert_close(r["after"][mask], one["after"][mask], rtol=0, atol=1e-5)
    assert two[1]["loss"] == pytest.approx(one["loss"], abs=1e-5)
    params = {**two[0]["params"], **two[1]["params"]}
    assert params.keys() == one["params"].keys()
    for k, v in one["params"].items():
        torch.testing.assert_close(params[k], v, rtol=0, atol=1e-5, msg=k)
    # The step did something (Adam at lr 1e-3 moves every weight it has a gradient for).
    assert (one["after"] - one["lp"])[mask].abs().max() > 1e-4


def test_pack_routes_follows_the_packed_token_order():
    from maspo_megatron.megatron.actor import pack_routes, pack_sequences

    batch = make_batch(random_routes())
    packed = pack_sequences(batch.input_ids, batch.lengths, batch.response_mask, pad_to_multiple=16)
    routes = pack_routes(batch.routed_experts, packed)
    total = int(batch.lengths.sum())
    assert routes.shape == (1, packed.input_ids.shape[1], LAYERS, TOPK)
    k = 0
    for i, n in enumerate(batch.lengths.tolist()):
        assert torch.equal(routes[0, k:k + n], batch.routed_experts[i, :n])
        k += n
    assert (routes[0, total:] == torch.arange(TOPK, dtype=torch.int32)).all()


def test_build_batch_places_each_samples_routes_and_names_a_missing_one():
    from maspo_megatron.generation import RolloutGroup
    from maspo_megatron.trainer import build_batch

    def group(index, routes):
        return RolloutGroup(prompt_index=index, prompt_ids=[3, 4, 5], answer="", outputs=[[6, 7], [8]],
                            logprobs=[[-1.0, -2.0], [-0.5]], finish=["stop", "stop"], rewards=[1.0, 0.0],
                            correct=[True, False], routed_experts=routes)

    g = torch.Generator().manual_seed(0)
    r = [torch.randint(0, EXPERTS, (n, LAYERS, TOPK), generator=g, dtype=torch.int32) for n in (4, 3, 4, 3)]
    batch = build_batch([group(0, r[:2]), group(1, r[2:])], torch.zeros(4), False, (LAYERS, TOPK))
    assert batch.routed_experts.shape == (4, 5, LAYERS, TOPK)
    for i, ri in enumerate(r):
        n = len(ri)
        assert torch.equal(batch.routed_experts[i, :n], ri)
        # The last token (never forwarded by the engine) and the padding: experts 0..topk-1.
        assert (batch.routed_experts[i, n:] == torch.arange(TOPK, dtype=torch.int32)).all()
    with pytest.raises(ValueError, match=r"sample 1 of prompt 7 has routed experts None"):
        build_batch([group(7, [r[0], None])], torch.zeros(2), False, (LAYERS, TOPK))
    with pytest.raises(ValueError, match=r"sample 0 of prompt 7 has routed experts \(3, 4, 2\)"):
        build_batch([group(7, [r[1], r[1]])], torch.zeros(2), False, (LAYERS, TOPK))
    with pytest.raises(ValueError, match=r"prompt 2.*did not reach training"):
        build_batch([group(2, [])], torch.zeros(2), False, (LAYERS, TOPK))


def test_routing_replay_config_refuses_a_dense_model_and_sets_the_server_flag(tmp_path):
    import json

    from maspo_megatron.generation import RolloutConfig, routing_replay_shape

    dense, moe = tmp_path / "dense", tmp_path / "moe"
    for d, cfg in ((dense, {"num_hidden_layers": 2, "architectures": ["Qwen3ForCausalLM"]}),
                   (moe, {"num_hidden_layers": 3, "num_experts_per_tok": 2})):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"rollout.routing_replay=True needs an MoE model.*dense"):
        routing_replay_shape(str(dense))
    assert routing_replay_shape(str(moe)) == (3, 2)
    replay = RolloutConfig(routing_replay=True, use_router=False)
    assert "--enable-return-routed-experts" in replay.server_spec(str(moe)).extra_args
    with pytest.raises(ValueError, match=r"use_router=False.*drops return_routed_experts"):
        RolloutConfig(routing_replay=True)
    assert RolloutConfig().server_spec(str(moe)).extra_args == []



def test_sequence_parallel_ranks_get_their_share_of_the_sequence():
    """Under SP a TP rank's router sees hidden states [L / tp, n] (megatron's
    scatter_to_sequence_parallel_region: an even split of dim 0); megatron's local spec refuses
    SP on CPU (torch LayerNorm), so the split is checked here, not in a forward."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    from maspo_megatron.megatron.routing_replay import RoutingReplay

    routes = random_routes()  # [N, L, layers, topk], L = 10
    hidden_order = routes.transpose(0, 1)  # [L, N, ...]: how [s, b, h] flattens
    tp = 2
    for rank in range(tp):
        chunk = torch.nn.Module()
        replay = RoutingReplay.__new__(RoutingReplay)
        replay.routers = [(layer, RouterReplay()) for layer in range(LAYERS)]
        replay._by_chunk = {id(chunk): replay.routers}
        replay.num_layers, replay.topk, replay.sp_rank, replay.sp_size = LAYERS, TOPK, rank, tp
        replay.set_micro_batch(routes, chunk)
        share = hidden_order.chunk(tp, 0)[rank].reshape(-1, LAYERS, TOPK)
        for layer, r in replay.routers:
            assert torch.equal(r.target_topk_idx, share[:, layer].long())
    replay.sp_size = 3
    with pytest.raises(ValueError, match="do not split over 3"):
        replay.set_micro_batch(routes, chunk)
