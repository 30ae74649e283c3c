"""The RL loop's control flow with stand-ins for the rollout engine, prompt loader and actor.

``Trainer.collect`` (dynamic sampling), ``Trainer.step`` and ``Trainer.run`` (bad-step handling)
run for real in a one-process gloo group; only what they call out to is replaced. That the real
actor detects a non-finite loss and skips the optimizer step is tested on a tiny Megatron model.
"""

from __future__ import annotations

import json
import math
import time
import types

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from maspo_megatron.data.dataset import PromptSample
from maspo_megatron.generation import RolloutGroup
from maspo_megatron.trainer import AlgorithmConfig, MetricsSink, Trainer, TrainerConfig


class FakeLoader:
    """Hands out prompts 0, 1, 2, ... and records each request's size."""

    def __init__(self):
        self.cursor = 0
        self.requests: list[int] = []

    def next_batch(self, size):
        self.requests.append(size)
        batch = [PromptSample(i, f"fake:{i}", (1, 2, 3), "p", "a") for i in range(self.cursor, self.cursor + size)]
        self.cursor += size
        return batch

    def state_dict(self):
        return {"cursor": self.cursor}


class FakeEngine:
    """Prompt i's group has one correct response when ``informative(i)``, else none."""

    def __init__(self, informative=lambda i: True):
        self.informative = informative
        self.seed_bases: list[int] = []
        self.closed = False
        self.client = types.SimpleNamespace(accepted_weight_versions=None, retries=0, run=None)

    def sync_targets(self):
        return [("http://fake:1", 0)]  # one server that never dies here

    def take_ready(self):
        return []

    def sample(self, prompts, n, seed_base, runner=None, enough=None):
        """Groups complete in prompt order; with ``enough``, the rest is aborted once it says so."""
        self.seed_bases.append(seed_base)
        # Served with the newest weights the trainer has synced (version 0 before any sync).
        version = max(map(int, self.client.accepted_weight_versions or ["0"]))
        groups = []
        for p in prompts:
            rewards = [1.0 if self.informative(p.index) and j == 0 else 0.0 for j in range(n)]
            groups.append(RolloutGroup(prompt_index=p.index, prompt_ids=list(p.prompt_ids), answer=p.answer,
                                       outputs=[[4, 5]] * n, logprobs=[[-1.0, -1.0]] * n, finish=["stop"] * n,
                                       rewards=rewards, correct=[r > 0 for r in rewards],
                                       versions=[[str(version)] * 2] * n, answered=[str(version)] * n))
            if enough is not None and enough(groups):
                break
        return groups

    def close(self, grace_s=None):
        self.closed = True


class FakePublisher:
    """Records the weight versions the trainer publishes."""

    def __init__(self):
        self.versions: list[int] = []
        self.releases = 0

    def release_rollout_memory(self):
        self.releases += 1

    def publish(self, model, version, targets=None):
        self.versions.append(version)
        return 0.0

    def close(self):
        pass


class FakeActor:
    """Reports a skipped (non-finite) optimizer step where ``skips[k]`` is true."""

    dp_size = 1
    model = None

    def __init__(self, skips):
        self.skips = list(skips)
        self.batches = []

    def deal(self, lengths):
        return [(torch.arange(len(lengths)), torch.zeros(len(lengths), dtype=torch.long))]

    def compute_logprobs(self, share, entropy=False):
        lp = torch.full(share.batch.input_ids.shape, -1.0)
        return lp, torch.ones_like(lp)

    def train_step(self, share):
        bad = self.skips[len(self.batches)]
        self.batches.append(share)
        return {"loss": math.nan if bad else -0.1, "grad_norm": math.nan if bad else 1.0,
                "skipped_steps": float(bad)}


@pytest.fixture
def trainer_factory(tmp_path):
    """Builds a Trainer in a one-process gloo group, wired to the fakes."""
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel, initialize_parallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    initialize_parallel(ParallelConfig())  # the batch goes out over megatron's groups

    def make(engine=None, fake_actor=None, **cfg_fields):
        cfg = TrainerConfig(output_dir=str(tmp_path / "run"), tensorboard=False, **cfg_fields)
        (tmp_path / "run").mkdir(exist_ok=True)
        t = Trainer(cfg)
        t.engine, t.loader, t.actor = engine or FakeEngine(), FakeLoader(), fake_actor
        t.publisher = FakePublisher()
        t.ref = None  # no reference policy (kl_coef = 0)
        t.start_step = 0
        t.sink = MetricsSink(cfg)
        t.saved = []
        t.save = t.saved.append
        return t

    yield make
    destroy_parallel()


def prompt_records(t):
    with open(f"{t.cfg.output_dir}/prompts.jsonl") as f:
        return [json.loads(line) for line in f]


def configure(t, *, prompts, n, rounds, dynamic=True):
    t.cfg.prompts_per_step = prompts
    t.cfg.rollout.n_samples = n
    t.cfg.algorithm.max_sampling_rounds = rounds
    t.cfg.algorithm.dynamic_sampling = dynamic


def test_dynamic_sampling_refills_to_the_batch_size(trainer_factory):
    t = trainer_factory(FakeEngine(informative=lambda i: i % 3 != 0))
    configure(t, prompts=8, n=4, rounds=4)
    groups, info = t.collect(step=0)
    # Round 1 draws 0..7 (0, 3, 6 all-equal), round 2 draws the 3 missing (9 all-equal), round 3 one.
    assert t.loader.requests == [8, 3, 1]
    assert [g.prompt_index for g in groups] == [1, 2, 4, 5, 7, 8, 10, 11]
    assert info["sampling/rounds"] == 3 and info["sampling/groups_seen"] == 12
    assert info["sampling/groups_kept"] == 8
    assert len(set(t.engine.seed_bases)) == 3  # every round samples with fresh seeds
    assert prompt_records(t) == [{"step": 1, "drawn": list(range(12)), "aborted": [],
                                  "trained": [1, 2, 4, 5, 7, 8, 10, 11],
                                  "versions": [[[[0, 2]]] * 4] * 8}]


def test_collect_times_all_its_rounds(trainer_factory):
    """``time/collect_s`` is the rollout's own duration, every sampling round included (in
    one_step_off it is measured on the prefetch thread, during the step before)."""
    engine = FakeEngine(informative=lambda i: i % 3 != 0)
    sample = engine.sample

    def slow(*args, **kw):
        time.sleep(0.1)
        return sample(*args, **kw)

    engine.sample = slow
    t = trainer_factory(engine)
    configure(t, prompts=8, n=4, rounds=4)
    _, info = t.collect(step=0)
    assert info["sampling/rounds"] == 3 and 0.3 <= info["time/collect_s"] < 10


def test_oversampling_aborts_the_rest_once_the_batch_is_full(trainer_factory):
    t = trainer_factory(FakeEngine(informative=lambda i: i % 3 != 0))
    configure(t, prompts=4, n=2, rounds=3)
    t.cfg.algorithm.oversample = 2.0
    groups, info = t.collect(step=0)
    # One round draws 8 prompts; 1, 2, 4, 5 are informative (0 and 3 are not): 6 and 7 are aborted.
    assert t.loader.requests == [8]
    assert [g.prompt_index for g in groups] == [1, 2, 4, 5]
    assert info["sampling/groups_seen"] == 6 and info["sampling/groups_aborted"] == 2
    (record,) = prompt_records(t)
    assert record["drawn"] == list(range(8)) and record["aborted"] == [6, 7] and record["trained"] == [1, 2, 4, 5]
    with pytest.raises(ValueError, match="algorithm.oversample > 1 .* needs algorithm.dynamic_sampling=true"):
        TrainerConfig(algorithm=AlgorithmConfig(dynamic_sampling=False, oversample=2.0))


def test_dynamic_sampling_says_why_it_cannot_fill(trainer_factory, capsys):
    t = trainer_factory(FakeEngine(informative=lambda i: i < 5))
    configure(t, prompts=8, n=4, rounds=3)
    groups, info = t.collect(step=6)
    assert [g.prompt_index for g in groups] == [0, 1, 2, 3, 4]
    assert t.loader.requests == [8, 3, 3]
    assert info["sampling/rounds"] == 3 and info["sampling/groups_kept"] == 5
    out = capsys.readouterr().out
    assert ("step 7: dynamic sampling found 5/8 prompts whose 4 responses disagree in reward after 3 "
            "rounds (algorithm.max_sampling_rounds); training on 5 groups") in out


def test_without_dynamic_sampling_one_round_keeps_every_group(trainer_factory):
    t = trainer_factory(FakeEngine(informative=lambda i: i == 0))
    configure(t, prompts=4, n=2, rounds=4, dynamic=False)
    groups, info = t.collect(step=0)
    assert [g.prompt_index for g in groups] == [0, 1, 2, 3] and t.loader.requests == [4]


def test_a_step_without_informative_groups_makes_no_update(trainer_factory, capsys):
    actor = FakeActor([])
    t = trainer_factory(FakeEngine(informative=lambda i: False), actor)
    configure(t, prompts=2, n=2, rounds=2)
    info = t.step(0)
    assert actor.batches == [] and info["sampling/groups_kept"] == 0
    assert "step 1: no informative prompt groups; no update this step" in capsys.readouterr().out


def test_bad_steps_are_reported_and_training_stops_after_max_bad_steps(trainer_factory, capsys):
    # Steps 2, 4, 5, 6 have a non-finite loss; step 3 resets the count, so step 6 is the third in a row.
    actor = FakeActor([0, 1, 0, 1, 1, 1, 0, 0])
    t = trainer_factory(FakeEngine(), actor, steps=8, prompts_per_step=2, max_bad_steps=3, save_every=1)
    configure(t, prompts=2, n=2, rounds=1)
    with pytest.raises(RuntimeError, match=r"3 consecutive steps had a non-finite loss and were skipped "
                                           r"\(max_bad_steps=3\); stopping at step 6"):
        t.run()
    out = capsys.readouterr().out
    assert "step 2: non-finite loss in 1 of 1 mini-batches" in out
    assert "step 6: non-finite loss in 1 of 1 mini-batches, their optimizer steps skipped " \
           "(3 consecutive bad steps; max_bad_steps=3)" in out
    with open(f"{t.cfg.output_dir}/metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]  # the failing step's metrics are kept
    assert [m["actor/skipped_steps"] for m in logged] == [0, 1, 0, 1, 1, 1]
    assert t.saved == [1, 2, 3, 4, 5] and len(actor.batches) == 6
    # Weights are published before the first step (the servers may hold anything) and after
    # every step, skipped or not (a skipped step publishes unchanged ones).
    assert t.publisher.versions == [0, 1, 2, 3, 4, 5, 6]
    assert t.engine.closed  # servers and workers are shut down on the way out


# ----------------------------------------------------------------------------- one_step_off


def one_step_off_fields(**rollout):
    from maspo_megatron.megatron.actor import ActorConfig
    from maspo_megatron.reward import RewardConfig
    from maspo_megatron.trainer import RolloutConfig

    return dict(actor=ActorConfig(tis_cap=2.0), reward=RewardConfig(num_workers=1),
                rollout=RolloutConfig(pipeline="one_step_off", **rollout))


def test_one_step_off_trains_each_prefetched_batch_one_version_behind(trainer_factory):
    actor = FakeActor([0] * 4)
    t = trainer_factory(FakeEngine(), actor, steps=4, prompts_per_step=2, save_every=1, **one_step_off_fields())
    configure(t, prompts=2, n=2, rounds=1)
    t.save = lambda step: t.saved.append((step, t._data_cursor()))
    t.run()
    with open(f"{t.cfg.output_dir}/metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    # Step 1's batch is sampled at version 0 before training; step k+1's while step k trains,
    # with the weights of version k, and trained at version k+1 (the sync waits for it).
    assert [m["rollout/staleness_max"] for m in logged] == [0, 1, 1, 1]
    records = prompt_records(t)
    assert [r["versions"][0][0] for r in records] == [[[0, 2]], [[0, 2]], [[1, 2]], [[2, 2]]]
    assert [i for r in records for i in r["trained"]] == list(range(8))
    assert t.publisher.versions == [0, 1, 2, 3, 4]
    # A checkpoint taken while the next step's prompts are prefetched holds the cursor before them.
    assert t.saved == [(1, {"cursor": 2}), (2, {"cursor": 4}), (3, {"cursor": 6}), (4, {"cursor": 8})]


def test_one_step_off_refuses_a_sample_older_than_the_bound(trainer_factory):
    class Frozen(FakeEngine):  # a server whose weights never change
        def sample(self, prompts, n, seed_base, runner=None, enough=None):
            groups = super().sample(prompts, n, seed_base, runner, enough)
            for g in groups:
                g.versions, g.answered = [["0"] * 2] * n, ["0"] * n
            return groups

    t = trainer_factory(Frozen(), FakeActor([0] * 4), steps=4, prompts_per_step=2, **one_step_off_fields())
    configure(t, prompts=2, n=2, rounds=1)
    with pytest.raises(RuntimeError, match=r"prompt 4 sample 0 was sampled with weight versions \[0\] but the "
                                           r"trainer holds version 2: rollout.pipeline=one_step_off trains "
                                           r"samples at most 1 version\(s\) old"):
        t.run()


def test_pipeline_config_names_what_it_needs():
    from maspo_megatron.reward import RewardConfig
    from maspo_megatron.rollout.weight_sync import WeightSyncConfig
    from maspo_megatron.trainer import RolloutConfig

    with pytest.raises(ValueError, match="rollout.pipeline must be 'sync' or 'one_step_off'"):
        RolloutConfig(pipeline="async")
    with pytest.raises(ValueError, match="rollout.partial='abort' needs rollout.pipeline=one_step_off"):
        RolloutConfig(partial="abort")
    with pytest.raises(ValueError, match="needs actor.tis_cap"):
        TrainerConfig(rollout=RolloutConfig(pipeline="one_step_off"))
    fields = one_step_off_fields(partial="continue")
    with pytest.raises(ValueError, match="rollout.partial=continue needs weight_sync.pause_mode=retract"):
        TrainerConfig(**fields)
    TrainerConfig(**fields, weight_sync=WeightSyncConfig(pause_mode="retract"))
    TrainerConfig(**one_step_off_fields(partial="abort"))
    with pytest.raises(ValueError, match="reward.num_workers >= 1"):
        TrainerConfig(**{**one_step_off_fields(), "reward": RewardConfig(num_workers=0)})


# ----------------------------------------------------------------------------- the real actor


def nonfinite_steps(rank, world_size, model_dir):
    from test_megatron_actor import make_batch

    from maspo_megatron.algo.objective import Objective
    from maspo_megatron.megatron.actor import Actor, ActorConfig, OptimizerConfig
    from maspo_megatron.megatron.convert import export_hf, load_hf_checkpoint
    from maspo_megatron.megatron.model import build_model
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel, initialize_parallel

    parallel = ParallelConfig()
    initialize_parallel(parallel)
    chunks = build_model(model_dir, parallel, dtype=torch.float32)
    load_hf_checkpoint(chunks, model_dir)
    cfg = ActorConfig(num_mini_batches=2, optimizer=OptimizerConfig(lr=1e-3))
    actor = Actor(chunks, cfg, objective=Objective(cfg))

    def params():
        return {k: v.detach().clone() for k, v in export_hf(actor.model)}

    batch = make_batch()
    batch.old_logprobs, _ = actor.compute_logprobs(batch)
    out = {"before": params(), "results": []}
    for poison in (math.nan, math.inf):
        bad = make_batch()
        bad.old_logprobs = batch.old_logprobs
        bad.advantages = bad.advantages.clone()
        bad.advantages[[0, 7]] = poison  # one sequence in each of the two mini-batches
        out["results"].append(actor.train_step(bad))
    out["after_bad"] = params()
    half = make_batch()
    half.old_logprobs = batch.old_logprobs
    half.advantages = half.advantages.clone()
    half.advantages[0] = math.nan  # only the first mini-batch is poisoned
    out["results"].append(actor.train_step(half))
    out["after_half"] = params()
    # A finite loss with a NaN gradient (e.g. an overflow inside backward) is skipped too.
    param = next(p for p in actor.model[0].parameters() if p.requires_grad)
    handle = param.register_hook(lambda g: g * math.nan)
    before_nan_grad = params()
    out["results"].append(actor.train_step(batch))
    handle.remove()
    out["nan_grad_unchanged"] = all(torch.equal(v, before_nan_grad[k]) for k, v in params().items())
    destroy_parallel()
    return out


def test_actor_skips_the_optimizer_step_on_a_non_finite_loss_or_gradient(tmp_path):
    from test_megatron_actor import make_tiny_llama

    make_tiny_llama(tmp_path)
    (out,) = run_distributed(nonfinite_steps, 1, str(tmp_path))
    nan_step, inf_step, half_step, nan_grad_step = out["results"]
    assert math.isfinite(nan_grad_step["loss"]) and nan_grad_step["skipped_steps"] == 2
    assert out["nan_grad_unchanged"]
    for r in (nan_step, inf_step):
        assert not math.isfinite(r["loss"]) and r["skipped_steps"] == 2
    for name, value in out["before"].items():
        assert torch.equal(out["after_bad"][name], value), f"{name} changed by a skipped step"
    # A clean mini-batch next to a poisoned one still trains.
    assert half_step["skipped_steps"] == 1
    assert any(not torch.equal(out["after_half"][k], v) for k, v in out["before"].items())
    for name, value in out["after_half"].items():
        assert torch.isfinite(value).all(), name
