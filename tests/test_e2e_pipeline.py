"""End to end: ``rollout.pipeline=one_step_off`` and its partial rollouts with a real SGLang server.

Each case is the real CLI (``maspo-megatron train --recipe tiny_cpu``: torchrun, 2 ranks at TP=2,
Megatron actor, weight sync over a gloo group and its proof) attached to one real SGLang 0.5.23
CPU server that the three cases share (started once for the module). The server runs at most
4 requests at a time, so a step's rollout lasts longer than the training it overlaps, and the
responses are still in flight at the weight sync -- what the partial modes are about.

Checked from the run's own records: every trained sample carries the weight version of each of
its tokens (the server's ``meta_info.weight_versions``, in ``prompts.jsonl``), no token is more
than one version older than the trainer that trained it, the prompts follow the data order with
none lost, repeated or trained twice, every step's loss is finite. Per mode: ``sync`` trains every
sample with the weights it was sampled with (the loop as before, now with the versions checked);
``one_step_off``
trains every batch after step 1 exactly one version behind (the sync waits for the rollout);
``continue`` trains responses whose tokens span two versions (sampled across a sync); ``abort``
re-sent requests the sync aborted, and none of its samples spans two versions.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from sglang_servers import sglang_manager

pytestmark = [pytest.mark.slow, pytest.mark.sglang]

STEPS = 3
PROMPTS, SAMPLES = 2, 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from maspo_megatron.demo import prepare_assets

    root = tmp_path_factory.mktemp("pipeline")
    assets = prepare_assets(str(root))
    (root / "logs").mkdir()
    manager = sglang_manager(assets["model"], 1, str(root / "logs"), extra_args=["--max-running-requests", "4"])
    manager.start()
    try:
        yield {"url": manager.urls[0], "assets": assets, "root": root}
    finally:
        manager.stop()


def _train(server, name: str, overrides: list[str], pipeline: str = "one_step_off") -> str:
    run_dir = str(server["root"] / name)
    assets = server["assets"]
    cmd = [sys.executable, "-m", "maspo_megatron.cli", "train", "--recipe", "tiny_cpu",
           f"model.path={assets['model']}", f"data.train_path={assets['train']}", f"output_dir={run_dir}",
           "eval_every=0", "tensorboard=false", f"steps={STEPS}", f"prompts_per_step={PROMPTS}",
           f"rollout.n_samples={SAMPLES}", "rollout.sampling.max_new_tokens=24",
           "algorithm.dynamic_sampling=false",  # every step trains (and syncs) whatever it drew
           f"rollout.server_urls={server['url']}", "rollout.use_router=false",
           f"rollout.pipeline={pipeline}", "actor.tis_cap=2.0", "reward.num_workers=1", *overrides]
    log = str(server["root"] / f"{name}.log")
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=600,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if code != 0:
        with open(log) as f:
            pytest.fail(f"{name}: exit code {code}\n{f.read()[-6000:]}")
    return run_dir


def _records(run_dir: str, name: str) -> list[dict]:
    with open(os.path.join(run_dir, name)) as f:
        return [json.loads(line) for line in f if line.strip()]


def _check_run(run_dir: str, assets: dict, bound: int = 1) -> tuple[list[dict], list[dict]]:
    """The checks every mode shares; returns the prompts and metrics records."""
    from maspo_megatron.cli import load_recipe
    from maspo_megatron.data import PromptDataset, PromptLoader, load_tokenizer

    records = _records(run_dir, "prompts.jsonl")
    metrics = _records(run_dir, "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for m in metrics:
        assert math.isfinite(m["actor/loss"]), m
    # The data order, none skipped or drawn twice; each drawn prompt trained once, in its step.
    data = load_recipe("tiny_cpu").data
    dataset = PromptDataset(assets["train"], data, load_tokenizer(assets["model"]))
    drawn = [i for r in records for i in r["drawn"]]
    expected = [p.index for p in PromptLoader(dataset, shuffle=data.shuffle, seed=data.seed).next_batch(len(drawn))]
    assert drawn == expected and len(drawn) == STEPS * PROMPTS
    trained = [i for r in records for i in r["trained"]]
    assert trained == drawn
    for r in records:
        trainer_version = r["step"] - 1  # the weights the trainer holds when it trains step r
        assert len(r["versions"]) == PROMPTS and all(len(g) == SAMPLES for g in r["versions"])
        for group in r["versions"]:
            for spans in group:
                assert spans, f"step {r['step']}: a sample without weight versions"
                for version, tokens in spans:
                    assert tokens > 0 and 0 <= trainer_version - version <= bound, (r["step"], spans)
    return records, metrics


def _sample_versions(record: dict) -> list[set[int]]:
    return [{v for v, _ in spans} for group in record["versions"] for spans in group]


@pytest.mark.timeout(1500)
def test_sync_trains_every_batch_on_policy(server):
    run_dir = _train(server, "sync", [], pipeline="sync")
    records, metrics = _check_run(run_dir, server["assets"], bound=0)
    for r in records:
        assert all(v == {r["step"] - 1} for v in _sample_versions(r)), r
    assert [m["rollout/staleness_max"] for m in metrics] == [0, 0, 0]


@pytest.mark.timeout(1500)
def test_one_step_off_trains_each_batch_one_version_behind(server):
    run_dir = _train(server, "one_step_off", [])
    records, metrics = _check_run(run_dir, server["assets"])
    assert all(v == {0} for v in _sample_versions(records[0]))
    for r in records[1:]:  # sampled while the step before trained, with its weights
        assert all(v == {r["step"] - 2} for v in _sample_versions(r)), r
    assert [m["rollout/staleness_max"] for m in metrics] == [0, 1, 1]
    assert [m["rollout/mixed_version_frac"] for m in metrics] == [0, 0, 0]
    print(f"PIPELINE one_step_off: per step rollout wait {[round(m['time/rollout_s'], 2) for m in metrics]} s, "
          f"drain before sync {[round(m['time/drain_s'], 2) for m in metrics]} s, "
          f"train {[round(m['time/train_s'] + m['time/logprob_s'], 2) for m in metrics]} s")


@pytest.mark.timeout(1500)
def test_partial_continue_finishes_responses_under_the_new_weights(server):
    run_dir = _train(server, "continue", ["rollout.partial=continue", "weight_sync.pause_mode=retract"])
    records, metrics = _check_run(run_dir, server["assets"])
    mixed = [v for r in records[1:] for v in _sample_versions(r) if len(v) == 2]
    assert mixed, "no response was in flight at a weight sync: the test did not exercise continue"
    print(f"PIPELINE continue: {len(mixed)} of {(STEPS - 1) * PROMPTS * SAMPLES} samples span two versions; "
          f"staleness_mean per step {[round(m['rollout/staleness_mean'], 3) for m in metrics]}")


@pytest.mark.timeout(1500)
def test_partial_abort_samples_aborted_responses_again(server):
    run_dir = _train(server, "abort", ["rollout.partial=abort", "weight_sync.pause_mode=abort"])
    records, metrics = _check_run(run_dir, server["assets"])
    assert all(len(v) == 1 for r in records for v in _sample_versions(r))  # aborted, never continued
    retried = sum(m["rollout/retries"] for m in metrics)
    assert retried > 0, "no response was in flight at a weight sync: the test did not exercise abort"
    print(f"PIPELINE abort: {retried:.0f} requests re-sent after a sync aborted them; "
          f"staleness_mean per step {[round(m['rollout/staleness_mean'], 3) for m in metrics]}")


@pytest.mark.timeout(1500)
def test_oversampling_with_one_step_off_accounts_for_every_prompt(server):
    """Dynamic sampling with over-sampling in the prefetched rollouts: 4 prompts drawn per needed
    one, the rest aborted once the batch is full (whether any is, depends on the random policy's
    rewards: the accounting holds either way)."""
    from maspo_megatron.cli import load_recipe
    from maspo_megatron.data import PromptDataset, PromptLoader, load_tokenizer

    run_dir = _train(server, "oversample", ["algorithm.dynamic_sampling=true", "algorithm.oversample=4.0",
                                            "algorithm.max_sampling_rounds=2", "prompts_per_step=1",
                                            "rollout.n_samples=8"])
    records = _records(run_dir, "prompts.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    data = load_recipe("tiny_cpu").data
    dataset = PromptDataset(server["assets"]["train"], data, load_tokenizer(server["assets"]["model"]))
    drawn = [i for r in records for i in r["drawn"]]
    assert drawn == [p.index for p in PromptLoader(dataset, shuffle=data.shuffle, seed=data.seed).next_batch(len(drawn))]
    trained = [i for r in records for i in r["trained"]]
    assert len(set(trained)) == len(trained)
    for r in records:
        assert set(r["trained"]) <= set(r["drawn"]) and not set(r["trained"]) & set(r["aborted"])
        assert len(r["drawn"]) % 4 == 0 and len(r["trained"]) <= 1  # 4 per needed prompt, each round
        for group in r["versions"]:
            assert len(group) == 8
            assert all(0 <= r["step"] - 1 - v <= 1 for spans in group for v, _ in spans)
    print(f"PIPELINE oversample: {len(drawn)} drawn, {sum(len(r['aborted']) for r in records)} aborted, "
          f"{len(trained)} trained over {STEPS} steps")
