"""A Slurm heterogeneous job through nemo-run: het group 0 runs the rollout servers and the
router, het group 1 runs torchrun training.

    python -m launch.slurm --recipe maspo_r1_distill_7b --train-nodes 2 --rollout-nodes 1 \
        --job-dir /lustre/me/nemo_jobs [--account A --partition P] \
        [--train-image IMG --rollout-image IMG] [--dry-run] model.path=... data.train_path=...

Run it from the repository root (``launch/`` is not an installed package). Each group runs in
its container image (pyxis ``--container-image``) when one is given, else bare-metal: nemo-run
runs ``srun --chdir <job>/code`` and the node command uses ``--python`` (default: the Python
running this launcher, so a shared-filesystem venv works as is). Code ships as a ``git archive``
of HEAD into the job directory, or from ``--code-dir``.

The batch script resolves both groups' node names and addresses with ``scontrol`` (outside any
container) into ``MASPO_{ROLLOUT,TRAIN}_{HOSTS,ADDRS}``; each node then runs
``python -m launch.node rollout|train`` from the code directory. ``--dry-run`` renders the
sbatch script offline (no Slurm, no SSH) and prints it.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass, field

from maspo_megatron.config import ConfigError
from launch.node import ENV_ROLLOUT_ADDRS, ENV_ROLLOUT_HOSTS, ENV_TRAIN_ADDRS, ENV_TRAIN_HOSTS
from launch.plan import LaunchError, LaunchPlan, Ports, make_plan, rollout_args, train_args

NODE_MODULE = "launch.node"
"""Run as ``python -m launch.node`` with the shipped code directory as working directory."""

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
# Node names and addresses of both het groups, resolved here because the containers have no
# scontrol. A node's address is its Slurm NodeAddr (what slurmctld reaches it at), else its name.
maspo_addrs() {{
  local h a
  for h in $(scontrol show hostnames "$1"); do
    a=$(scontrol show node "$h" 2>/dev/null | tr ' ' '\\n' | sed -n 's/^NodeAddr=//p' | head -n1)
    echo "${{a:-$h}}"
  done | paste -sd, -
}}
export {ENV_ROLLOUT_HOSTS}=$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_0" | paste -sd, -)
export {ENV_TRAIN_HOSTS}=$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_1" | paste -sd, -)
: "${{{ENV_ROLLOUT_HOSTS}:?no hostnames for het group 0 (rollout)}}"
: "${{{ENV_TRAIN_HOSTS}:?no hostnames for het group 1 (training)}}"
export {ENV_ROLLOUT_ADDRS}=$(maspo_addrs "$SLURM_JOB_NODELIST_HET_GROUP_0")
export {ENV_TRAIN_ADDRS}=$(maspo_addrs "$SLURM_JOB_NODELIST_HET_GROUP_1")
echo "rollout nodes: ${ENV_ROLLOUT_HOSTS} (${ENV_ROLLOUT_ADDRS}); training nodes: ${ENV_TRAIN_HOSTS} (${ENV_TRAIN_ADDRS}); attempt ${{SLURM_RESTART_COUNT:-0}}\""""


@dataclass
class SlurmOptions:
    job_dir: str
    """Directory on the cluster where nemo-run stages the job (code, scripts, logs)."""
    account: str | None = None
    partition: str | None = None
    train_image: str | None = None
    """Training container (NGC PyTorch/NeMo with TE and this package's dependencies); None:
    bare-metal with ``python``."""
    rollout_image: str | None = None
    """Rollout container (an SGLang image with sglang-router); None: bare-metal."""
    python: str | None = None
    """Interpreter of the bare-metal groups (default: this launcher's); containers use ``python``."""
    time: str = "04:00:00"
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = True
    ssh_host: str | None = None
    """Submit over SSH from another machine; None submits with the local sbatch."""
    ssh_user: str | None = None
    code_dir: str | None = None
    """This repository already on the cluster; None packages the committed tree (git archive)."""
    mounts: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    """Requeues after a failure (the run resumes from its last checkpoint)."""
    monitor_wait_s: int = 10
    """nemo-run's ``monitor_group_job_wait_time``: how often the batch script checks its two
    sruns, and how long it waits after the first one ends before killing the other (nemo-run's
    default is 60 s on both counts)."""
    name: str = "maspo"

    def __post_init__(self):
        if not self.job_dir:
            raise LaunchError("--job-dir is required")
        for mount in self.mounts:
            if ":" not in mount:
                raise LaunchError(f"--mount {mount!r} must look like SRC:DST")
        if self.mounts and not (self.train_image or self.rollout_image):
            raise LaunchError("--mount needs a container image (--train-image/--rollout-image); "
                              "bare-metal groups see the nodes' filesystems as they are")
        if self.retries < 0:
            raise LaunchError(f"--retries must be >= 0, got {self.retries}")
        if self.monitor_wait_s < 1:
            raise LaunchError(f"--monitor-wait must be >= 1 second, got {self.monitor_wait_s}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise LaunchError(f"--name {self.name!r}: letters, digits, '_', '.', '-' only")


@dataclass
class Submitted:
    """A submitted job: Slurm's id and where nemo-run staged it."""

    job_id: str
    experiment_id: str
    job_dir: str
    """The job's directory on the cluster: code/, the sbatch script, the groups' logs."""


def _quote(args: list[str]) -> list[str]:
    # nemo-run joins a Slurm role's arguments into the script's srun line without quoting.
    return [shlex.quote(a) for a in args]


def _env(values: dict[str, str]) -> dict[str, str]:
    # nemo-run writes ``export KEY=VALUE`` verbatim.
    return {k: shlex.quote(v) for k, v in values.items()}


def _tunnel(opts: SlurmOptions):
    import nemo_run as run

    if opts.ssh_host:
        return run.SSHTunnel(host=opts.ssh_host, user=opts.ssh_user or os.environ.get("USER", ""),
                             job_dir=opts.job_dir)
    # A local submission stages the experiment right where the tunnel submits from: nemo-run's
    # LocalTunnel looks for <job_dir>/<title>/<id>/, and an Experiment with base_dir B writes
    # B/experiments/<title>/<id>/ (see experiment()).
    return run.LocalTunnel(job_dir=os.path.join(os.path.abspath(opts.job_dir), "experiments"))


def experiment(opts: SlurmOptions, **kw):
    """The nemo-run Experiment, staged where its tunnel submits from."""
    import nemo_run as run

    if opts.ssh_host:
        return run.Experiment(opts.name, **kw)  # staged locally, rsynced to the tunnel's job_dir
    return run.Experiment(opts.name, base_dir=os.path.abspath(opts.job_dir), **kw)


def build_job(plan: LaunchPlan, opts: SlurmOptions, tunnel=None, dry_run: bool = False):
    """The two nemo-run tasks and executors of the het job: [rollout, train]. ``dry_run`` skips
    packaging the code (the script is the same: it runs in <job>/code either way)."""
    import nemo_run as run

    tunnel = tunnel or _tunnel(opts)
    mounts = list(opts.mounts)
    if opts.code_dir:
        # nemo-run links <job>/code to it (only its GitArchivePackager does; a plain Packager
        # with symlink_from_remote_dir leaves <job>/code missing).
        packager = run.GitArchivePackager(symlink_from_remote_dir=os.path.abspath(opts.code_dir))
        if opts.train_image or opts.rollout_image:
            mounts.append(f"{opts.code_dir}:{opts.code_dir}")  # the symlink's target, inside the container
    elif dry_run:
        packager = run.Packager()
    else:
        packager = run.GitArchivePackager()

    def executor(nodes: int, gpus: int, image: str | None, env: dict[str, str], **kw):
        return run.SlurmExecutor(
            account=opts.account, partition=opts.partition, time=opts.time, qos=opts.qos,
            constraint=opts.constraint, nodes=nodes, ntasks_per_node=1, gpus_per_node=gpus,
            exclusive=opts.exclusive or None, container_image=image,
            container_mounts=list(mounts) if image else [], env_vars=_env(env),
            heterogeneous=True, tunnel=tunnel, packager=packager, job_name_prefix=f"{opts.name}-",
            retries=opts.retries, wait_time_for_group_job=0,
            monitor_group_job_wait_time=opts.monitor_wait_s, **kw)

    def python(image: str | None) -> str:
        return "python" if image else (opts.python or sys.executable)

    # Group 0's environment is exported for the whole script (nemo-run), so it holds what both
    # groups share; group 1 adds the training-only variables.
    rollout_exec = executor(plan.rollout_nodes, plan.rollout_gpus_per_node, opts.rollout_image,
                            {**COMMON_ENV, **opts.env}, setup_lines=SETUP_LINES)
    train_exec = executor(plan.train_nodes, plan.train_gpus_per_node, opts.train_image, TRAIN_ENV)
    rollout = run.Script(path=NODE_MODULE, m=True, entrypoint=python(opts.rollout_image),
                         args=_quote(rollout_args(plan)))
    train = run.Script(path=NODE_MODULE, m=True, entrypoint=python(opts.train_image),
                       args=_quote(train_args(plan)))
    return [rollout, train], [rollout_exec, train_exec]


def render_sbatch(plan: LaunchPlan, opts: SlurmOptions) -> str:
    """The sbatch script nemo-run would submit, rendered offline (nemo-run's dry run)."""
    import nemo_run as run

    with tempfile.TemporaryDirectory() as base:
        # Offline: a local tunnel, whatever --ssh-host says (the script is the same).
        tunnel = run.LocalTunnel(job_dir=os.path.join(base, "experiments")) if opts.ssh_host else None
        tasks, executors = build_job(plan, opts, tunnel=tunnel, dry_run=True)
        with run.Experiment(opts.name, base_dir=base, log_level="WARN") as exp:
            exp.add(tasks, executor=executors, name=opts.name)
            exp.dryrun(log=False, delete_exp_dir=False)
        scripts = glob.glob(os.path.join(base, "**", "*_sbatch.sh"), recursive=True)
        if len(scripts) != 1:
            raise RuntimeError(f"nemo-run's dry run wrote {len(scripts)} sbatch scripts, expected 1")
        with open(scripts[0]) as f:
            return f.read()


def submit(plan: LaunchPlan, opts: SlurmOptions) -> Submitted:
    tasks, executors = build_job(plan, opts)
    with experiment(opts, log_level="WARN") as exp:
        exp.add(tasks, executor=executors, name=opts.name)
        exp.run(detach=True)
        job = exp.jobs[0]
        handle = job.handle  # "<scheduler>://<app>/<slurm job id>"
        executor = job.executor
        return Submitted(job_id=handle.rstrip("/").rsplit("/", 1)[-1], experiment_id=exp._id,
                         job_dir=os.path.join(executor.tunnel.job_dir, os.path.basename(executor.job_dir)))


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
    p.add_argument("--train-nodes", type=int, required=True)
    p.add_argument("--rollout-nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per training node (and rollout node)")
    p.add_argument("--rollout-gpus-per-node", type=int, default=None,
                   help="GPUs per rollout node (default: --gpus-per-node); servers = this / rollout.sglang_tp")
    p.add_argument("--job-dir", required=True, help="staging directory on the cluster")
    p.add_argument("--account", default=None)
    p.add_argument("--partition", default=None)
    p.add_argument("--train-image", default=None,
                   help="training container image (NGC PyTorch/NeMo); default: bare-metal")
    p.add_argument("--rollout-image", default=None, help="SGLang container image; default: bare-metal")
    p.add_argument("--python", default=None,
                   help="interpreter of bare-metal groups on the nodes (default: the one running this launcher)")
    p.add_argument("--time", default="04:00:00")
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--no-exclusive", action="store_true", help="do not ask for whole nodes")
    p.add_argument("--ssh-host", default=None, help="submit over SSH (default: local sbatch)")
    p.add_argument("--ssh-user", default=None)
    p.add_argument("--code-dir", default=None, help="repository on the cluster (default: git archive of HEAD)")
    p.add_argument("--mount", action="append", default=[], metavar="SRC:DST", help="container mount")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--retries", type=int, default=0, help="requeues after a failure (resumes from the checkpoint)")
    p.add_argument("--monitor-wait", type=int, default=SlurmOptions.monitor_wait_s, metavar="S",
                   help="seconds between the job script's checks of its two groups, and before it "
                        "ends the other group once one has exited (default: %(default)s)")
    p.add_argument("--name", default="maspo")
    p.add_argument("--server-port", type=int, default=Ports.server)
    p.add_argument("--router-port", type=int, default=Ports.router)
    p.add_argument("--master-port", type=int, default=Ports.master)
    p.add_argument("--weight-sync-port", type=int, default=Ports.weight_sync,
                   help="weight-update rendezvous port on the training nodes (0: the recipe's)")
    p.add_argument("--gpu-gb", type=float, default=80.0,
                   help="GPU memory in GiB: the memory plan must fit it (maspo-megatron plan)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = make_plan(args.recipe, args.overrides, train_nodes=args.train_nodes,
                         train_gpus_per_node=args.gpus_per_node, rollout_nodes=args.rollout_nodes,
                         rollout_gpus_per_node=args.rollout_gpus_per_node or args.gpus_per_node,
                         ports=Ports(args.server_port, args.router_port, args.master_port,
                                     args.weight_sync_port), gpu_gb=args.gpu_gb)
        opts = SlurmOptions(
            job_dir=args.job_dir, account=args.account, partition=args.partition,
            train_image=args.train_image, rollout_image=args.rollout_image, python=args.python,
            time=args.time, qos=args.qos, constraint=args.constraint, exclusive=not args.no_exclusive,
            ssh_host=args.ssh_host, ssh_user=args.ssh_user, code_dir=args.code_dir, mounts=args.mount,
            env=_key_values(args.env, "--env"), retries=args.retries, monitor_wait_s=args.monitor_wait,
            name=args.name)
    except ConfigError as e:  # LaunchError, unknown recipe, bad override
        print(f"launch.slurm: {e}", file=sys.stderr)
        return 2
    except NotImplementedError as e:
        print(f"launch.slurm: recipe {args.recipe} is not available: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(render_sbatch(plan, opts))
        return 0
    job = submit(plan, opts)
    print(f"launch.slurm: submitted Slurm job {job.job_id} (nemo-run experiment {job.experiment_id}); "
          f"job directory {job.job_dir}; training output in {plan.output_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
