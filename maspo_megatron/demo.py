"""``maspo-megatron demo``: the whole RL loop on a laptop CPU, with no download.

Creates a character-level tokenizer, a random-init tiny Llama and the synthetic "a+b=" dataset
locally, trains with the ``tiny_cpu`` recipe (2 torchrun processes, TP=2), then writes the
learning curve (PNG) next to the metrics file and says whether the reward rose.
"""

from __future__ import annotations

import json
import os
import shutil
import sys


def prepare_assets(output_dir: str, seed: int = 0, task: str = "add") -> dict[str, str]:
    """The tiny model, its tokenizer and the synthetic ``task``'s data under ``output_dir``/assets."""
    from maspo_megatron.data import SyntheticTaskConfig, make_demo_model, make_demo_tokenizer, \
        make_synthetic_dataset

    assets = os.path.join(output_dir, "assets")
    model_dir = os.path.join(assets, "model")
    os.makedirs(model_dir, exist_ok=True)
    tokenizer = make_demo_tokenizer(model_dir)
    make_demo_model(model_dir, tokenizer, seed=seed)
    train, evaluation = make_synthetic_dataset(os.path.join(assets, "data"),
                                              SyntheticTaskConfig(task=task, seed=seed))
    return {"model": model_dir, "train": train, "eval": evaluation}


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_learning_curve(metrics: list[dict], out_png: str, title: str = "MASPO on the CPU demo") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics if "reward/mean" in m]
    reward = [m["reward/mean"] for m in metrics if "reward/mean" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, reward, label="rollout reward (mean)")
    evals = [(m["step"], v) for m in metrics for k, v in m.items() if k.startswith("eval/avg@")]
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval Avg@k")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def summarize(metrics: list[dict], window: int = 5) -> tuple[float, float]:
    rewards = [m["reward/mean"] for m in metrics if "reward/mean" in m]
    if len(rewards) < 2 * window:
        window = max(1, len(rewards) // 2)
    return sum(rewards[:window]) / window, sum(rewards[-window:]) / window


def run_demo(output_dir: str, overrides: list[str], seed: int = 0) -> int:
    from maspo_megatron.cli import load_recipe, main as cli_main
    from maspo_megatron.config import apply_overrides

    apply_overrides(load_recipe("tiny_cpu"), overrides)  # a bad key fails before any file is written
    run_dir = os.path.join(output_dir, "run")
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # a demo always starts from scratch
    paths = prepare_assets(output_dir, seed)
    print(f"demo: tiny model, tokenizer and data in {os.path.join(output_dir, 'assets')}", flush=True)
    code = cli_main([
        "train", "--recipe", "tiny_cpu",
        f"model.path={paths['model']}", f"data.train_path={paths['train']}",
        f"data.eval_path={paths['eval']}", f"output_dir={run_dir}", f"seed={seed}", *overrides,
    ])
    if code != 0:
        print(f"demo: training failed (exit code {code}); logs in {run_dir}", file=sys.stderr)
        return code
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    metrics = read_metrics(metrics_path)
    png = os.path.join(output_dir, "learning_curve.png")
    plot_learning_curve(metrics, png)
    first, last = summarize(metrics)
    print(f"demo: reward {first:.3f} (first steps) -> {last:.3f} (last steps); "
          f"plot {png}; metrics {metrics_path}", flush=True)
    return 0
