"""A Slurm heterogeneous job through nemo-run: het group 0 runs the SGLang servers and the
router (SGLang image), het group 1 runs torchrun training (NGC PyTorch/NeMo image).

    python -m launch.slurm --recipe maspo_r1_distill_7b --account A --partition P \
        --train-image IMG --rollout-image IMG --train-nodes 2 --rollout-nodes 1 \
        --job-dir /lustre/me/nemo_jobs [--dry-run] model.path=... data.train_path=...

The batch script resolves both groups' hostnames with ``scontrol`` (outside the containers)
into ``MASPO_ROLLOUT_HOSTS`` / ``MASPO_TRAIN_HOSTS``; each node then runs
``python -m maspo_megatron.launch.node rollout|train``. ``--dry-run`` renders the sbatch script
offline (no Slurm, no SSH) and prints it.
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass, field

from maspo_megatron.config import ConfigError
from maspo_megatron.launch.node import ENV_ROLLOUT_HOSTS, ENV_TRAIN_HOSTS
from maspo_megatron.launch.plan import LaunchError, LaunchPlan, Ports, make_plan, rollout_args, train_args

NODE_MODULE = "maspo_megatron.launch.node"

COMMON_ENV = {
    # The trainer's log-probs are of softmax(logits / T); so must SGLang's be (DESIGN.md). Pinned
    # so that a cluster-wide setting cannot silently switch the servers to pre-temperature ones.
    "SGLANG_RETURN_ORIGINAL_LOGPROB": "0",
    # A failed collective raises instead of hanging until the Slurm time limit.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
}
TRAIN_ENV = {
    # Megatron's TP/sequence-parallel overlap relies on kernels being issued in order.
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
}

SETUP_LINES = f"""\
# Hostnames of both het groups, resolved here because the containers have no scontrol.
export {ENV_ROLLOUT_HOSTS}=$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_0" | paste -sd, -)
export {ENV_TRAIN_HOSTS}=$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_1" | paste -sd, -)
: "${{{ENV_ROLLOUT_HOSTS}:?no hostnames for het group 0 (rollout)}}"
: "${{{ENV_TRAIN_HOSTS}:?no hostnames for het group 1 (training)}}"
echo "rollout nodes: ${ENV_ROLLOUT_HOSTS}; training nodes: ${ENV_TRAIN_HOSTS}\""""


@dataclass
class SlurmOptions:
    account: str
    train_image: str
    """Training container (NGC PyTorch/NeMo with TE and this package's dependencies)."""
    rollout_image: str
    """Rollout container (an SGLang image with sglang-router)."""
    job_dir: str
    """Directory on the cluster where nemo-run stages the job (code, scripts, logs)."""
    partition: str | None = None
    time: str = "04:00:00"
    qos: str | None = None
    constraint: str | None = None
    gpus_per_node: int = 8
    ssh_host: str | None = None
    """Submit over SSH from another machine; None submits with the local sbatch."""
    ssh_user: str | None = None
    code_dir: str | None = None
    """This repository already on the cluster; None packages the committed tree (git archive)."""
    mounts: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    """Requeues after a failure (the run resumes from its last checkpoint)."""
    name: str = "maspo"

    def __post_init__(self):
        for key in ("account", "train_image", "rollout_image", "job_dir"):
            if not getattr(self, key):
                raise LaunchError(f"--{key.replace('_', '-')} is required")
        for mount in self.mounts:
            if ":" not in mount:
                raise LaunchError(f"--mount {mount!r} must look like SRC:DST")
        if self.retries < 0:
            raise LaunchError(f"--retries must be >= 0, got {self.retries}")


def _quote(args: list[str]) -> list[str]:
    # nemo-run joins a Slurm role's arguments into the script's srun line without quoting.
    return [shlex.quote(a) for a in args]


def _env(values: dict[str, str]) -> dict[str, str]:
    # nemo-run writes ``export KEY=VALUE`` verbatim.
    return {k: shlex.quote(v) for k, v in values.items()}


def build_job(plan: LaunchPlan, opts: SlurmOptions):
    """The two nemo-run tasks and executors of the het job: [rollout, train]."""
    import nemo_run as run

    if opts.ssh_host:
        tunnel = run.SSHTunnel(host=opts.ssh_host, user=opts.ssh_user or os.environ.get("USER", ""),
                               job_dir=opts.job_dir)
    else:
        tunnel = run.LocalTunnel(job_dir=opts.job_dir)
    mounts = list(opts.mounts)
    if opts.code_dir:
        packager = run.Packager(symlink_from_remote_dir=opts.code_dir)
        mounts.append(f"{opts.code_dir}:{opts.code_dir}")  # the symlink's target, inside the container
    else:
        packager = run.GitArchivePackager()

    def executor(nodes: int, image: str, env: dict[str, str], **kw):
        return run.SlurmExecutor(
            account=opts.account, partition=opts.partition, time=opts.time, qos=opts.qos,
            constraint=opts.constraint, nodes=nodes, ntasks_per_node=1, gpus_per_node=opts.gpus_per_node,
            exclusive=True, container_image=image, container_mounts=list(mounts), env_vars=_env(env),
            heterogeneous=True, tunnel=tunnel, packager=packager, job_name_prefix=f"{opts.name}-",
            retries=opts.retries, wait_time_for_group_job=0, **kw)

    # Group 0's environment is exported for the whole script (nemo-run), so it holds what both
    # groups share; group 1 adds the training-only variables.
    rollout_exec = executor(plan.rollout_nodes, opts.rollout_image, {**COMMON_ENV, **opts.env},
                            setup_lines=SETUP_LINES)
    train_exec = executor(plan.train_nodes, opts.train_image, TRAIN_ENV)
    rollout = run.Script(path=NODE_MODULE, m=True, entrypoint="python", args=_quote(rollout_args(plan)))
    train = run.Script(path=NODE_MODULE, m=True, entrypoint="python", args=_quote(train_args(plan)))
    return [rollout, train], [rollout_exec, train_exec]


def render_sbatch(plan: LaunchPlan, opts: SlurmOptions) -> str:
    """The sbatch script nemo-run would submit, rendered offline (nemo-run's dry run)."""
    import nemo_run as run

    tasks, executors = build_job(plan, opts)
    with tempfile.TemporaryDirectory() as base:
        with run.Experiment(opts.name, base_dir=base, log_level="WARN") as exp:
            exp.add(tasks, executor=executors, name=opts.name)
            exp.dryrun(log=False, delete_exp_dir=False)
        scripts = glob.glob(os.path.join(base, "**", "*_sbatch.sh"), recursive=True)
        if len(scripts) != 1:
            raise RuntimeError(f"nemo-run's dry run wrote {len(scripts)} sbatch scripts, expected 1")
        with open(scripts[0]) as f:
            return f.read()


def submit(plan: LaunchPlan, opts: SlurmOptions) -> None:
    import nemo_run as run

    tasks, executors = build_job(plan, opts)
    with run.Experiment(opts.name) as exp:
        exp.add(tasks, executor=executors, name=opts.name)
        exp.run(detach=True)


def _key_values(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise LaunchError(f"{flag} {item!r} must look like KEY=VALUE")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", required=True, help="recipe name (recipes/NAME.py) or path")
    p.add_argument("--account", required=True)
    p.add_argument("--partition", default=None)
    p.add_argument("--train-image", required=True, help="training container image (NGC PyTorch/NeMo)")
    p.add_argument("--rollout-image", required=True, help="SGLang container image")
    p.add_argument("--train-nodes", type=int, required=True)
    p.add_argument("--rollout-nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--job-dir", required=True, help="staging directory on the cluster")
    p.add_argument("--time", default="04:00:00")
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--ssh-host", default=None, help="submit over SSH (default: local sbatch)")
    p.add_argument("--ssh-user", default=None)
    p.add_argument("--code-dir", default=None, help="repository on the cluster (default: git archive of HEAD)")
    p.add_argument("--mount", action="append", default=[], metavar="SRC:DST")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--retries", type=int, default=0)
    p.add_argument("--name", default="maspo")
    p.add_argument("--server-port", type=int, default=Ports.server)
    p.add_argument("--router-port", type=int, default=Ports.router)
    p.add_argument("--master-port", type=int, default=Ports.master)
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = make_plan(args.recipe, args.overrides, train_nodes=args.train_nodes,
                         train_gpus_per_node=args.gpus_per_node, rollout_nodes=args.rollout_nodes,
                         rollout_gpus_per_node=args.gpus_per_node,
                         ports=Ports(args.server_port, args.router_port, args.master_port))
        opts = SlurmOptions(
            account=args.account, train_image=args.train_image, rollout_image=args.rollout_image,
            job_dir=args.job_dir, partition=args.partition, time=args.time, qos=args.qos,
            constraint=args.constraint, gpus_per_node=args.gpus_per_node, ssh_host=args.ssh_host,
            ssh_user=args.ssh_user, code_dir=args.code_dir, mounts=args.mount,
            env=_key_values(args.env, "--env"), retries=args.retries, name=args.name)
    except ConfigError as e:  # LaunchError, unknown recipe, bad override
        print(f"launch.slurm: {e}", file=sys.stderr)
        return 2
    except NotImplementedError as e:
        print(f"launch.slurm: recipe {args.recipe} is not available: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(render_sbatch(plan, opts))
        return 0
    submit(plan, opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
