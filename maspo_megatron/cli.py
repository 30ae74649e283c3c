"""``maspo-megatron``: train, config, plan, eval, export-hf, demo.

``train`` runs under torchrun; started without it, it starts torchrun itself with as many
processes as the layout needs (``--nproc-per-node``), so one command works on a laptop and in a
Slurm step alike.

The run ends with this command: SIGINT/SIGTERM/SIGHUP are forwarded to torchrun (which forwards
them to every rank), torchrun dies with this process (a parent-death SIGTERM, also when this one
is SIGKILLed), and each rank dies with torchrun (see ``runtime/lifetime.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from maspo_megatron.config import ConfigError, apply_overrides

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.py") if not p.stem.startswith("_"))


def recipe_module(name: str):
    """The recipe module ``recipes/NAME.py`` (or a ``.py`` path), imported.

    Its directory goes on ``sys.path`` first, so a recipe imports the modules next to it like
    any Python module (``from _maspo_math import maspo_math_config``).
    """
    path = Path(name) if name.endswith(".py") else RECIPES_DIR / f"{name}.py"
    if not path.is_file():
        raise ConfigError(f"unknown recipe {name!r} (no {path}); available: {', '.join(list_recipes())}")
    directory = str(path.resolve().parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location(f"maspo_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "build"):
        raise ConfigError(f"recipe {path} has no build() function")
    return module


def load_recipe(name: str):
    """A recipe by name (``recipes/NAME.py``) or path; its ``build()`` returns a TrainerConfig."""
    return recipe_module(name).build()


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


# torchrun's wait for the ranks after forwarding a signal, before it SIGKILLs them (a rank's own
# clean-up is bounded at 10 s by its watchdog); and ours for torchrun, before we SIGKILL it.
TORCHRUN_SHUTDOWN_S = 15
TORCHRUN_KILL_AFTER_S = 25.0


def _bind_to_launcher() -> None:
    """In a rank: SIGTERM when torchrun (the parent) dies, even by SIGKILL."""
    import signal

    from maspo_megatron.rollout.servers import set_parent_death_signal

    parent = os.getppid()
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:
        sys.exit(128 + signal.SIGTERM)  # the launcher died before we asked


def _relaunch_with_torchrun(nproc: int, argv: list[str], extra_env: dict[str, str] | None = None) -> int:

    from maspo_megatron.rollout.servers import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           f"--shutdown-timeout={TORCHRUN_SHUTDOWN_S}", "-m", "maspo_megatron.cli", *argv]
    env = dict(os.environ)
    if nproc > 1:
        # What torchrun itself sets for more than one process, minus its four-line banner saying so.
        env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra_env or {})
    return _run_forwarding_signals(cmd, env)


def _run_forwarding_signals(cmd: list[str], env: dict) -> int:
    """Runs torchrun in a session of its own (a terminal's Ctrl-C reaches it once, through us),
    tied to this process by a parent-death SIGTERM; forwards SIGINT/SIGTERM/SIGHUP to it and
    SIGKILLs it when it has not ended ``TORCHRUN_KILL_AFTER_S`` later (or on a second signal).
    Returns 128 + the first signal when interrupted, else torchrun's exit code."""
    import signal
    import subprocess
    import time

    from maspo_megatron.rollout.servers import set_parent_death_signal

    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            preexec_fn=lambda: set_parent_death_signal(signal.SIGTERM))
    received: list[tuple[int, float]] = []

    def kill_torchrun() -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the ranks follow by their parent-death SIGTERM
        except (ProcessLookupError, PermissionError):
            pass

    def forward(signum, frame) -> None:
        if received:
            kill_torchrun()
            return
        received.append((signum, time.monotonic()))
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, forward) for s in forwarded}
    try:
        while True:
            try:
                code = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if received and time.monotonic() - received[0][1] > TORCHRUN_KILL_AFTER_S:
                    kill_torchrun()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 + received[0][0] if received else code


def _default_nproc(cfg) -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    p = cfg.parallel
    return p.tp * p.pp * p.cp


def cmd_train(args) -> int:
    under = _under_torchrun()
    if under:
        _bind_to_launcher()  # first: loading the recipe imports torch and megatron (seconds)
    from maspo_megatron.preflight import PREFLIGHT_DONE_ENV, run_preflight

    cfg = apply_overrides(load_recipe(args.recipe), args.overrides)
    nproc = int(os.environ["WORLD_SIZE"]) if under else (args.nproc_per_node or _default_nproc(cfg))
    # Checked here, before torchrun, so a bad config, model or data file is one line (exit 2),
    # not a traceback on every rank minutes later. The ranks of our own torchrun skip it.
    if os.environ.get(PREFLIGHT_DONE_ENV) != "1":
        for note in run_preflight(cfg, nproc=nproc, recipe=args.recipe):
            if os.environ.get("RANK", "0") == "0":
                print(f"maspo-megatron: {note}", file=sys.stderr, flush=True)
    if not under:
        return _relaunch_with_torchrun(nproc, ["train", "--recipe", args.recipe, *args.overrides],
                                       extra_env={PREFLIGHT_DONE_ENV: "1"})
    from maspo_megatron.trainer import train

    train(cfg)
    return 0


def cmd_eval(args) -> int:
    from maspo_megatron.evaluate import EvalConfig, run_eval

    cfg = apply_overrides(EvalConfig(), args.overrides)
    results = run_eval(cfg)
    for k, v in results.items():
        print(f"{k}: {v:.4f}")
    return 0


def cmd_export_hf(args) -> int:
    if not _under_torchrun():
        # From the parsed arguments, not sys.argv: main(argv) may be called from Python.
        return _relaunch_with_torchrun(args.nproc_per_node or 1, [
            "export-hf", "--checkpoint", args.checkpoint, "--model", args.model, "--out", args.out,
            "--tp", str(args.tp), "--pp", str(args.pp)])
    _bind_to_launcher()
    from maspo_megatron.megatron.export import export_checkpoint_to_hf

    export_checkpoint_to_hf(args.checkpoint, args.model, args.out, tp=args.tp, pp=args.pp)
    return 0


def cmd_config(args) -> int:
    import dataclasses
    import json

    from maspo_megatron.config import describe, format_keys, to_dict

    keys = describe(apply_overrides(load_recipe(args.recipe), args.overrides))
    if args.json:
        text = json.dumps([{"key": k.key, "type": k.type, "value": to_dict(k.value),
                            "default": None if k.default is dataclasses.MISSING else to_dict(k.default),
                            "required": k.default is dataclasses.MISSING, "doc": k.doc} for k in keys],
                          indent=1)
    else:
        text = (f"# {args.recipe}{' ' + ' '.join(args.overrides) if args.overrides else ''}: {len(keys)} "
                "keys, as `key = value  [type; default]` and the key's doc; set any with key=value\n"
                + format_keys(keys))
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `maspo-megatron config ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def cmd_plan(args) -> int:
    from maspo_megatron.megatron.memory import plan_recipe

    module = recipe_module(args.recipe)
    cfg = apply_overrides(module.build(), args.overrides)
    title = f"maspo-megatron plan --recipe {' '.join([args.recipe, *args.overrides])}: memory per GPU"
    plan = plan_recipe(cfg, module, train_gpus=args.train_gpus, rollout_gpus=args.rollout_gpus,
                       gpu_gib=args.gpu_gb, reserve_gib=args.reserve_gb, title=title)
    print(plan.format(), flush=True)
    return 0 if plan.fits else 1


def cmd_demo(args) -> int:
    from maspo_megatron.demo import run_demo

    return run_demo(args.output_dir, args.overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maspo-megatron", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="RL training from a recipe")
    p.add_argument("--recipe", required=True, help=f"recipe name or .py path ({', '.join(list_recipes())})")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="processes when not under torchrun (default: GPUs, or tp*pp*cp on CPU)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides; `maspo-megatron config --recipe R` lists every key "
                        "with its type, value, default and doc")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("config", help="every config key of a recipe: type, value, default, doc")
    p.add_argument("--recipe", required=True, help=f"recipe name or .py path ({', '.join(list_recipes())})")
    p.add_argument("--json", action="store_true", help="a JSON list of {key, type, value, default, doc}")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides applied before showing the values (as `train` would)")
    p.set_defaults(fn=cmd_config)

    p = sub.add_parser("plan", help="layout checks and per-GPU memory of a recipe, against a GPU size")
    p.add_argument("--recipe", required=True, help=f"recipe name or .py path ({', '.join(list_recipes())})")
    p.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory in GiB (default 80)")
    p.add_argument("--train-gpus", type=int, default=None,
                   help="training GPUs (default: the recipe's TRAIN_NODES x GPUS_PER_NODE, else tp*pp*cp)")
    p.add_argument("--rollout-gpus", type=int, default=None,
                   help="rollout GPUs, 0 to skip SGLang (default: ROLLOUT_NODES x GPUS_PER_NODE, else "
                        "rollout.num_servers x rollout.sglang_tp)")
    p.add_argument("--reserve-gb", type=float, default=4.0,
                   help="per training GPU: CUDA context, NCCL, fragmentation (an estimate; default 4)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for `train`")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("eval", help="Avg@k / Pass@k of a model on a dataset through SGLang servers")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="EvalConfig fields, e.g. model_path=DIR data.eval_path=F k=16")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("export-hf", help="a training checkpoint -> a Hugging Face directory")
    p.add_argument("--checkpoint", required=True, help="checkpoints directory (latest step) of a run")
    p.add_argument("--model", required=True, help="the HF directory the run started from (config, tokenizer)")
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--nproc-per-node", type=int, default=None)
    p.set_defaults(fn=cmd_export_hf)

    p = sub.add_parser("demo", help="the embedded CPU demo: MASPO learns a synthetic task in minutes")
    p.add_argument("--output-dir", default="outputs/demo")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(fn=cmd_demo)

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"maspo-megatron: config error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
