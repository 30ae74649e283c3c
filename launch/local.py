"""The same two parts on one machine through nemo-run's LocalExecutor: rollout servers + router
on some GPUs, torchrun training on the others (``CUDA_VISIBLE_DEVICES`` splits them).

    python -m launch.local --recipe maspo_r1_distill_1_5b --train-gpus 4 --rollout-gpus 4 \
        [--dry-run] model.path=... data.train_path=...

Run it from the repository root; both processes run ``python -m launch.node`` from this checkout.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from maspo_megatron.config import ConfigError
from launch.node import ENV_ROLLOUT_ADDRS, ENV_ROLLOUT_HOSTS, ENV_TRAIN_ADDRS, ENV_TRAIN_HOSTS
from launch.plan import LaunchPlan, Ports, make_plan, require_positive, rollout_args, train_args
from launch.slurm import COMMON_ENV, NODE_MODULE, TRAIN_ENV

LOOPBACK = "127.0.0.1"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def local_tasks(plan: LaunchPlan, python: str = sys.executable) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, argv, environment) of the rollout and training processes."""
    train_gpus = list(range(plan.train_gpus_per_node))
    rollout_gpus = [plan.train_gpus_per_node + i for i in range(plan.rollout_gpus_per_node)]
    hosts = {ENV_ROLLOUT_HOSTS: LOOPBACK, ENV_TRAIN_HOSTS: LOOPBACK,
             ENV_ROLLOUT_ADDRS: LOOPBACK, ENV_TRAIN_ADDRS: LOOPBACK}
    # ``-m launch.node`` finds this checkout whatever directory nemo-run starts the process in.
    path = os.pathsep.join([REPO, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])
    common = {**COMMON_ENV, **hosts, "PYTHONPATH": path}
    single = ["--node-rank", "0"]
    return [
        ("rollout", [python, "-m", NODE_MODULE, *rollout_args(plan, [*single, "--bind-host", LOOPBACK])],
         {**common, "CUDA_VISIBLE_DEVICES": ",".join(map(str, rollout_gpus))}),
        ("train", [python, "-m", NODE_MODULE, *train_args(plan, single)],
         {**common, **TRAIN_ENV, "CUDA_VISIBLE_DEVICES": ",".join(map(str, train_gpus))}),
    ]


def run_local(plan: LaunchPlan, name: str = "maspo-local") -> None:
    import nemo_run as run

    with run.Experiment(name) as exp:
        for task, argv, env in local_tasks(plan):
            script = run.Script(path=argv[2], m=True, entrypoint=argv[0], args=argv[3:])
            exp.add(script, executor=run.LocalExecutor(env_vars=env), name=task)
        exp.run(tail_logs=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", required=True)
    p.add_argument("--train-gpus", type=int, required=True, help="GPUs 0..N-1 train")
    p.add_argument("--rollout-gpus", type=int, required=True, help="the next N GPUs serve rollouts")
    p.add_argument("--name", default="maspo-local")
    p.add_argument("--server-port", type=int, default=Ports.server)
    p.add_argument("--router-port", type=int, default=Ports.router)
    p.add_argument("--master-port", type=int, default=Ports.master)
    p.add_argument("--weight-sync-port", type=int, default=Ports.weight_sync)
    p.add_argument("--gpu-gb", type=float, default=80.0,
                   help="GPU memory in GiB: the memory plan must fit it (maspo-megatron plan)")
    p.add_argument("--dry-run", action="store_true", help="print the two commands; run nothing")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    try:
        require_positive("--train-gpus", args.train_gpus)
        require_positive("--rollout-gpus", args.rollout_gpus)
        plan = make_plan(args.recipe, args.overrides, train_nodes=1, train_gpus_per_node=args.train_gpus,
                         rollout_nodes=1, rollout_gpus_per_node=args.rollout_gpus,
                         ports=Ports(args.server_port, args.router_port, args.master_port,
                                     args.weight_sync_port), gpu_gb=args.gpu_gb)
    except ConfigError as e:  # LaunchError, unknown recipe, bad override
        print(f"launch.local: {e}", file=sys.stderr)
        return 2
    except NotImplementedError as e:
        print(f"launch.local: recipe {args.recipe} is not available: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for task, argv_, env in local_tasks(plan):
            print(f"# {task}\n{' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())} {shlex.join(argv_)}")
        return 0
    run_local(plan, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
