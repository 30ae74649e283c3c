"""Rollout/training overlap: step time of rollout.pipeline=sync, one_step_off and its partial
rollouts (continue, abort), the real trainer against a SIMULATED rollout server.

The trainer is real: ``maspo-megatron train --recipe tiny_cpu`` (torchrun, 2 ranks at TP=2,
Megatron training, weight sync over a gloo group with its log-prob proof). The rollout server is
``benchmarks/simulated_server.py``: real tokens and log-probs from the tiny HF model, decode
*paced* by a GPU latency model (an H100 roofline for Llama-3.1-8B, times ``--time-scale``), with a
running-request limit. The scale is chosen so that a step's generation lasts about as long as
its training -- where overlap matters; the figures are those of that simulation, not of a GPU.

Per mode, over the steps of ``--repeats`` runs less the first ``--skip-first`` (warm-up; and
one_step_off's first step has nothing to overlap) and the last (it has no next rollout): median [min, max] of the step time, the rollout wait, log-prob + train, the
drain before the sync (one_step_off without partial) and the sync; response tokens per second of
step time; and step / max(rollout, train), where rollout is the sync mode's median rollout time
(the same generation, not overlapped) and train this mode's own -- the target for one_step_off is
<= 1.1. The server's own counters give the running batch it kept (time-weighted mean while busy,
peak) against its limit, which the client reads from ``/server_info``
(``rollout.client.read_server_limits``); overrun is the share of decode steps whose real CPU
compute outlasted the modelled time (there the server was slower than the model); retries the
median per step of requests the client sent again (aborted by a sync, or rejected).

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
                                                  "overruns", "aborted", "retracted")}
    server["peak_running"] = after["peak_running"]
    return metrics, server


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
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--train-overrides", default="actor.micro_batch_tokens=64 actor.num_mini_batches=4",
                    help="trainer overrides that set the training work per step (space-separated)")
    ap.add_argument("--skip-first", type=int, default=2, help="warm-up steps of each run left out")
    ap.add_argument("--out", default=None, help="append the table to this file")
    args = ap.parse_args()
    from maspo_megatron.demo import prepare_assets

    root = tempfile.mkdtemp(prefix="overlap-")
    assets = prepare_assets(root)
    manager = simulated_manager(assets["model"], 1, root, max_running=args.max_running, time_scale=args.time_scale)
    manager.start()
    rows: dict[str, dict] = {}
    try:
        url = manager.urls[0]
        for rep in range(args.repeats):
            for mode in args.modes.split(","):
                t0 = time.monotonic()
                metrics, server = _run(args, url, assets, root, mode, rep)
                row = rows.setdefault(mode, {"metrics": [], "server": []})
                # The last step has no next rollout to overlap (nor drain) in one_step_off.
                row["metrics"] += metrics[args.skip_first:-1]
                row["server"].append(server)
                print(f"{mode} run {rep}: {time.monotonic() - t0:.0f}s, step times "
                      f"{[round(m['time/step_s'], 2) for m in metrics]}", flush=True)
    finally:
        manager.stop()
    head = (f"# SIMULATED rollout server (benchmarks/simulated_server.py): H100 roofline for Llama-3.1-8B "
            f"x{args.time_scale} time scale; real tiny_cpu trainer (TP=2, gloo)\n"
            f"# {args.prompts} prompts x {args.samples} samples, <= {args.max_new_tokens} new tokens, "
            f"server limit {args.max_running} running, {args.steps} steps x {args.repeats} runs "
            f"(steps 1-{args.skip_first} and the last of each run left out); median [min, max] seconds\n")
    sync_rollout = statistics.median(m["time/rollout_s"] for m in rows["sync"]["metrics"]) if "sync" in rows else None
    lines = [f"{'mode':22} {'step s':>20} {'rollout wait s':>20} {'logprob+train s':>20} {'drain s':>20} "
             f"{'sync s':>20} {'tok/s':>7} {'step/max':>8} {'mean run':>8} {'peak':>4} {'overrun':>7} {'retries':>7}"]
    for mode, row in rows.items():
        ms = row["metrics"]
        step = [m["time/step_s"] for m in ms]
        train = [m["time/logprob_s"] + m["time/train_s"] for m in ms]
        tokens = [m["response/length_mean"] * args.prompts * args.samples for m in ms] \
            if "response/length_mean" in ms[0] else None
        tps = f"{statistics.median(t / s for t, s in zip(tokens, step)):7.1f}" if tokens else f"{'n/a':>7}"
        ratio = (f"{statistics.median(step) / max(sync_rollout, statistics.median(train)):8.2f}"
                 if sync_rollout is not None else f"{'n/a':>8}")
        sv = row["server"]
        busy = sum(s["busy_s"] for s in sv)
        mean_running = sum(s["running_x_s"] for s in sv) / busy if busy else 0.0
        steps = sum(s["decode_steps"] for s in sv)
        overrun = sum(s["overruns"] for s in sv) / steps if steps else 0.0
        lines.append(f"{mode:22} {_fmt(step):>20} {_fmt([m['time/rollout_s'] for m in ms]):>20} {_fmt(train):>20} "
                     f"{_fmt([m['time/drain_s'] for m in ms]):>20} {_fmt([m['time/sync_s'] for m in ms]):>20} "
                     f"{tps} {ratio} {mean_running:8.1f} {max(s['peak_running'] for s in sv):4d} {overrun:7.0%} "
                     f"{statistics.median(m['rollout/retries'] for m in ms):7.1f}")
    text = head + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
