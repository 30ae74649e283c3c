"""Rollout/training overlap: step time of rollout.pipeline=sync, one_step_off and its partial
rollouts (continue, abort), the real trainer against a SIMULATED rollout server.

The trainer is real: ``maspo-megatron train --recipe tiny_cpu`` (torchrun, 2 ranks at TP=2,
Megatron training, weight sync over a gloo group with its log-prob proof). The rollout server is
``benchmarks/simulated_server.py``: decode *paced* by a GPU latency model (an H100 roofline for
Llama-3.1-8B, times ``--time-scale``), with a running-request limit; its response tokens come
from a stated distribution (EOS with probability ``--eos-prob`` per token), not from the model,
so that on these shared cores it costs the trainer almost nothing and a rollout lasts what the
model says (the weight sync and its proof still go to the real tiny model it holds). The scale
is chosen so that a step's generation lasts about as long as its training, or longer -- where
overlap matters; the figures are those of that simulation, not of a GPU.

Per mode, over the steps of ``--repeats`` runs less the first ``--skip-first`` (warm-up; and
one_step_off's first step has nothing to overlap) and the last (it has no next rollout): median
[min, max] of the step time, the rollout wait, log-prob + train, the drain before the sync
(one_step_off without partial) and the sync; the rollout's own duration (collect: in
one_step_off it ran during the step before); response tokens per second of step time; and, per
step, step / max(rollout, train): rollout is the sync mode's rollout wait, in the same repeat,
for the work generated during that step (one_step_off: the next step's rollout; partial: the
mean of this and the next step's) -- the same prompts and seeds, so the same tokens, generated
while the trainer waits -- and train the step's own log-prob + train time. The target for
one_step_off is <= 1.1; without partial rollouts its floor is (rollout + sync) / rollout, since
no request may be in flight during the sync. The server's own counters give the running batch
it kept (time-weighted mean while busy, peak) against its limit, which the client reads from
``/server_info`` (``rollout.client.read_server_limits``); overrun is the share of decode steps
whose real CPU compute outlasted the modelled time (there the server was slower than the model);
host the share of the server's busy time spent computing on the host (the rest is modelled time
slept); retries the median per step of requests the client sent again (aborted by a sync, or
rejected).

    python benchmarks/overlap.py --repeats 2 --steps 7 --time-scale 4 --out benchmarks/results/overlap_simulated.txt
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from simulated_server import simulated_manager  # noqa: E402

MODES = {
    "sync": ["rollout.pipeline=sync"],
    "one_step_off": ["rollout.pipeline=one_step_off"],
    "one_step_off+continue": ["rollout.pipeline=one_step_off", "rollout.partial=continue",
                              "weight_sync.pause_mode=retract"],
    "one_step_off+abort": ["rollout.pipeline=one_step_off", "rollout.partial=abort",
                           "weight_sync.pause_mode=abort"],
}


def _stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/sim_stats", timeout=60) as r:
        return json.loads(r.read())


def _run(args, url: str, assets: dict, root: str, mode: str, rep: int) -> tuple[list[dict], dict]:
    run_dir = os.path.join(root, f"{mode}-{rep}")
    cmd = [sys.executable, "-m", "maspo_megatron.cli", "train", "--recipe", "tiny_cpu",
           f"model.path={assets['model']}", f"data.train_path={assets['train']}", f"output_dir={run_dir}",
           "eval_every=0", "tensorboard=false", f"steps={args.steps}", f"prompts_per_step={args.prompts}",
           f"rollout.n_samples={args.samples}", f"rollout.sampling.max_new_tokens={args.max_new_tokens}",
           "algorithm.dynamic_sampling=false", f"rollout.server_urls={url}", "rollout.use_router=false",
           "rollout.client.read_server_limits=true", "actor.tis_cap=2.0", "reward.num_workers=1",
           *args.train_overrides.split(), *MODES[mode]]
    before = _stats(url)
    log = run_dir + ".log"
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=1200,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if code != 0:
        with open(log) as f:
            raise RuntimeError(f"{mode} run {rep}: exit code {code}\n{f.read()[-4000:]}")
    after = _stats(url)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    server = {k: after[k] - before[k] for k in ("busy_s", "running_x_s", "tokens", "decode_steps",
                                                  "overruns", "aborted", "retracted", "compute_s")}
    server["peak_running"] = after["peak_running"]
    return metrics, server


def _ratio(mode: str, metrics: list[dict], sync: list[dict], i: int) -> float:
    """Step ``i``'s time over max(the sync mode's rollout of the work generated in it, its train)."""
    generated = [i] if mode == "sync" else [i + 1] if mode == "one_step_off" else [i, i + 1]
    rollout = statistics.mean(sync[j]["time/rollout_s"] for j in generated)
    m = metrics[i]
    return m["time/step_s"] / max(rollout, m["time/logprob_s"] + m["time/train_s"])


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} [{min(values):.2f}, {max(values):.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--max-running", type=int, default=16, help="the simulated server's running-request limit")
    ap.add_argument("--time-scale", type=float, default=4.0)
    ap.add_argument("--eos-prob", type=float, default=0.05, help="the simulated server's EOS probability per token")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--train-overrides", default="actor.micro_batch_tokens=64 actor.num_mini_batches=4",
                    help="trainer overrides that set the training work per step (space-separated)")
    ap.add_argument("--skip-first", type=int, default=2, help="warm-up steps of each run left out")
    ap.add_argument("--out", default=None, help="append the table to this file")
    args = ap.parse_args()
    from maspo_megatron.demo import prepare_assets

    root = tempfile.mkdtemp(prefix="overlap-")
    assets = prepare_assets(root)
    manager = simulated_manager(assets["model"], 1, root, max_running=args.max_running, time_scale=args.time_scale,
                                eos_prob=args.eos_prob)
    manager.start()
    rows: dict[str, dict] = {}
    sync_runs: dict[int, list[dict]] = {}  # the sync mode's metrics per repeat: the reference rollouts
    try:
        url = manager.urls[0]
        for rep in range(args.repeats):
            for mode in args.modes.split(","):
                t0 = time.monotonic()
                metrics, server = _run(args, url, assets, root, mode, rep)
                row = rows.setdefault(mode, {"metrics": [], "server": [], "ratios": []})
                # The last step has no next rollout to overlap (nor drain) in one_step_off.
                window = range(args.skip_first, len(metrics) - 1)
                row["metrics"] += [metrics[i] for i in window]
                row["server"].append(server)
                if mode == "sync":
                    sync_runs[rep] = metrics
                if rep in sync_runs:
                    row["ratios"] += [_ratio(mode, metrics, sync_runs[rep], i) for i in window]
                print(f"{mode} run {rep}: {time.monotonic() - t0:.0f}s, step times "
                      f"{[round(m['time/step_s'], 2) for m in metrics]}", flush=True)
    finally:
        manager.stop()
    head = (f"# SIMULATED rollout server (benchmarks/simulated_server.py): H100 roofline for Llama-3.1-8B "
            f"x{args.time_scale} time scale, response tokens from its stated distribution (EOS p={args.eos_prob} "
            f"per token); real tiny_cpu trainer (TP=2, gloo)\n"
            f"# {args.prompts} prompts x {args.samples} samples, <= {args.max_new_tokens} new tokens, "
            f"server limit {args.max_running} running, {args.steps} steps x {args.repeats} runs "
            f"(steps 1-{args.skip_first} and the last of each run left out); median [min, max] seconds\n"
            f"# step/max: per step, step / max(rollout, train), median [min, max]; rollout = the sync mode's rollout "
            f"wait in the same repeat for the rollout(s) generated in that step (same prompts and seeds: the same "
            f"tokens), not overlapped -- sync: its own, one_step_off: the next step's, partial: the mean of both; "
            f"train = the step's own log-prob + train\n")
    lines = [f"{'mode':22} {'step s':>20} {'rollout wait s':>20} {'logprob+train s':>20} {'drain s':>20} "
             f"{'sync s':>20} {'collect s':>20} {'tok/s':>7} {'step/max':>20} {'mean run':>8} {'peak':>4} {'overrun':>7} {'host':>5} {'retries':>7}"]
    for mode, row in rows.items():
        ms = row["metrics"]
        step = [m["time/step_s"] for m in ms]
        train = [m["time/logprob_s"] + m["time/train_s"] for m in ms]
        tokens = [m["response/length_mean"] * args.prompts * args.samples for m in ms] \
            if "response/length_mean" in ms[0] else None
        tps = f"{statistics.median(t / s for t, s in zip(tokens, step)):7.1f}" if tokens else f"{'n/a':>7}"
        ratio = _fmt(row["ratios"]) if row["ratios"] else "n/a"
        sv = row["server"]
        busy = sum(s["busy_s"] for s in sv)
        mean_running = sum(s["running_x_s"] for s in sv) / busy if busy else 0.0
        steps = sum(s["decode_steps"] for s in sv)
        overrun = sum(s["overruns"] for s in sv) / steps if steps else 0.0
        host = sum(s["compute_s"] for s in sv) / busy if busy else 0.0
        lines.append(f"{mode:22} {_fmt(step):>20} {_fmt([m['time/rollout_s'] for m in ms]):>20} {_fmt(train):>20} "
                     f"{_fmt([m['time/drain_s'] for m in ms]):>20} {_fmt([m['time/sync_s'] for m in ms]):>20} "
                     f"{_fmt([m['time/collect_s'] for m in ms]):>20} "
                     f"{tps} {ratio:>20} {mean_running:8.1f} {max(s['peak_running'] for s in sv):4d} {overrun:7.0%} {host:5.0%} "
                     f"{statistics.median(m['rollout/retries'] for m in ms):7.1f}")
    text = head + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
