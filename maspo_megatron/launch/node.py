"""What runs on each node of a launch: ``rollout`` (SGLang servers, and the router on the first
rollout node) or ``train`` (torchrun of ``maspo-megatron train`` with the servers' URLs).

Hostnames come from ``MASPO_ROLLOUT_HOSTS`` / ``MASPO_TRAIN_HOSTS`` (comma lists the Slurm job
script derives from ``SLURM_JOB_NODELIST_HET_GROUP_{0,1}`` with ``scontrol``, which the
containers lack) or from ``--rollout-hosts`` / ``--train-hosts``. A node finds its own rank by
its Slurm node name in that list, so nothing depends on how Slurm numbers het-job components.

Imports only the standard library and ``rollout.servers`` (no torch, no megatron): the rollout
side runs in the SGLang container.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import sys
import time

from maspo_megatron.rollout.servers import (
    RouterManager,
    ServerManager,
    SGLangServerConfig,
    sglang_server_command,
)

ENV_ROLLOUT_HOSTS = "MASPO_ROLLOUT_HOSTS"
ENV_TRAIN_HOSTS = "MASPO_TRAIN_HOSTS"
ROUTER_HEALTH = "/health_generate"  # the router's /health answers before any worker registered


class NodeError(RuntimeError):
    """A node cannot start its part of the job; the message says which input is wrong."""


def parse_hosts(text: str | None, what: str, env: str) -> list[str]:
    hosts = [h.strip() for h in (text or "").split(",") if h.strip()]
    if not hosts:
        raise NodeError(f"no {what} hostnames: {env} is unset or empty (the Slurm job script sets it "
                        f"from its het-group node list); pass --{what}-hosts h1,h2,...")
    return hosts


def this_node() -> str:
    """This node's name as Slurm lists it (``SLURMD_NODENAME``), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def node_rank(hosts: list[str], explicit: int | None = None) -> int:
    if explicit is not None:
        if not 0 <= explicit < len(hosts):
            raise NodeError(f"--node-rank {explicit} is outside the {len(hosts)} hosts {hosts}")
        return explicit
    name = this_node()
    for candidate in (name, name.split(".")[0]):
        if candidate in hosts:
            return hosts.index(candidate)
    raise NodeError(f"this node ({name}) is not among the hosts {hosts}; pass --node-rank")


def server_urls(rollout_hosts: list[str], servers_per_node: int, server_port: int) -> list[str]:
    """Every server of the job: ``servers_per_node`` consecutive ports on each rollout host."""
    return [f"http://{h}:{server_port + i}" for h in rollout_hosts for i in range(servers_per_node)]


def router_url(rollout_hosts: list[str], router_port: int) -> str:
    return f"http://{rollout_hosts[0]}:{router_port}"


def train_command(*, rollout_hosts: list[str], train_hosts: list[str], rank: int, advertise_host: str,
                  nproc_per_node: int, servers_per_node: int, server_port: int, router_port: int,
                  master_port: int, recipe: str, overrides: list[str],
                  python: str = sys.executable) -> list[str]:
    """torchrun on one training node; the trainer attaches to the job's servers and router.

    ``weight_sync.master_address`` is this node's own name: it is used only by the weight-sync
    senders (one per pipeline stage, possibly on different nodes), each of which hosts the NCCL
    rendezvous that the servers connect to.
    """
    return [
        python, "-m", "torch.distributed.run", f"--nnodes={len(train_hosts)}",
        f"--nproc-per-node={nproc_per_node}", f"--node-rank={rank}",
        f"--master-addr={train_hosts[0]}", f"--master-port={master_port}",
        "-m", "maspo_megatron.cli", "train", "--recipe", recipe, *overrides,
        f"rollout.server_urls={json.dumps(server_urls(rollout_hosts, servers_per_node, server_port))}",
        f"rollout.router_url={router_url(rollout_hosts, router_port)}",
        f"weight_sync.master_address={advertise_host}",
    ]


def wait_for_rollouts(urls: list[str], router: str, timeout_s: float) -> None:
    """Blocks until every server answers /health and the router /health_generate."""
    try:
        ServerManager.attach(urls, startup_timeout_s=timeout_s).wait_healthy(urls)
        ServerManager.attach([router], startup_timeout_s=timeout_s,
                             health_path=ROUTER_HEALTH).wait_healthy([router])
    except TimeoutError as e:
        raise NodeError(f"{e}. The rollout nodes' logs say why (Slurm: the het-group-0 log, and "
                        "<output_dir>/rollout_logs/<node>/ for each server)") from None


def _exit_on_sigterm() -> None:
    # Slurm ends a step with SIGTERM; turning it into SystemExit runs the ``finally`` blocks that
    # stop the servers (they run in their own sessions and would outlive this process).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def run_rollout(args) -> int:
    hosts = parse_hosts(args.rollout_hosts, "rollout", ENV_ROLLOUT_HOSTS)
    rank = node_rank(hosts, args.node_rank)
    if args.num_gpus % args.sglang_tp:
        raise NodeError(f"--sglang-tp {args.sglang_tp} must divide --num-gpus {args.num_gpus}")
    per_node = args.num_gpus // args.sglang_tp
    base = SGLangServerConfig(model_path=args.model_path, tp_size=args.sglang_tp,
                              mem_fraction_static=args.mem_fraction_static, host=args.bind_host,
                              extra_args=list(args.sglang_arg))

    def command(port: int) -> list[str]:
        gpu = (port - args.server_port) * args.sglang_tp
        return sglang_server_command(dataclasses.replace(base, base_gpu_id=gpu), port)

    log_dir = os.path.join(args.log_dir, hosts[rank])
    os.makedirs(log_dir, exist_ok=True)
    servers = ServerManager(command, per_node, host="127.0.0.1",
                            ports=[args.server_port + i for i in range(per_node)],
                            startup_timeout_s=args.startup_timeout, log_dir=log_dir)
    router = None
    _exit_on_sigterm()
    try:
        servers.start()
        print(f"[rollout node {rank}] {per_node} SGLang server(s) healthy on {hosts[rank]}", flush=True)
        if rank == 0:
            urls = server_urls(hosts, per_node, args.server_port)
            ServerManager.attach(urls, startup_timeout_s=args.startup_timeout).wait_healthy(urls)
            router = RouterManager(urls, host=args.bind_host, port=args.router_port, log_dir=log_dir,
                                   startup_timeout_s=args.startup_timeout)
            router.start()
            print(f"[rollout node 0] router on {router_url(hosts, args.router_port)} over {len(urls)} "
                  "servers", flush=True)
        # A dead server is not restarted: it would come back with the initial weights. Exiting
        # makes the job fail (and requeue from the last checkpoint when retries are allowed).
        while True:
            dead = servers.dead() + (router.dead() if router else [])
            if dead:
                print(f"[rollout node {rank}] exited: {dead}; logs in {log_dir}", file=sys.stderr, flush=True)
                return 1
            time.sleep(args.poll_s)
    finally:
        if router is not None:
            router.stop()
        servers.stop()


def run_train(args) -> int:
    rollout_hosts = parse_hosts(args.rollout_hosts, "rollout", ENV_ROLLOUT_HOSTS)
    train_hosts = parse_hosts(args.train_hosts, "train", ENV_TRAIN_HOSTS)
    rank = node_rank(train_hosts, args.node_rank)
    cmd = train_command(rollout_hosts=rollout_hosts, train_hosts=train_hosts, rank=rank,
                        advertise_host=args.advertise_host or train_hosts[rank],
                        nproc_per_node=args.nproc_per_node, servers_per_node=args.servers_per_node,
                        server_port=args.server_port, router_port=args.router_port,
                        master_port=args.master_port, recipe=args.recipe, overrides=args.overrides)
    if not args.no_wait:
        # Fail with the servers' URLs in the message rather than inside NCCL set-up; costs the
        # overlap of server start-up with the trainer's checkpoint load, once per job.
        wait_for_rollouts(server_urls(rollout_hosts, args.servers_per_node, args.server_port),
                          router_url(rollout_hosts, args.router_port), args.startup_timeout)
    print(f"[train node {rank}] {' '.join(cmd)}", flush=True)
    os.execvp(cmd[0], cmd)
    return 1  # not reached: execvp replaces this process


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m maspo_megatron.launch.node", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="role", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--rollout-hosts", default=os.environ.get(ENV_ROLLOUT_HOSTS),
                        help=f"comma list (default: ${ENV_ROLLOUT_HOSTS})")
    common.add_argument("--node-rank", type=int, default=None,
                        help="this node's index in its host list (default: found by node name)")
    common.add_argument("--server-port", type=int, required=True)
    common.add_argument("--router-port", type=int, required=True)
    common.add_argument("--startup-timeout", type=float, default=1800.0,
                        help="seconds to wait for servers and router to become healthy")

    p = sub.add_parser("rollout", parents=[common], help="SGLang servers (+ router on node 0)")
    p.add_argument("--model-path", required=True)
    p.add_argument("--num-gpus", type=int, required=True, help="GPUs of this node for servers")
    p.add_argument("--sglang-tp", type=int, required=True)
    p.add_argument("--mem-fraction-static", type=float, default=None)
    p.add_argument("--bind-host", default="0.0.0.0", help="address servers and router listen on")
    p.add_argument("--log-dir", required=True)
    p.add_argument("--sglang-arg", action="append", default=[], help="extra sglang.launch_server argument")
    p.add_argument("--poll-s", type=float, default=10.0)
    p.set_defaults(fn=run_rollout)

    p = sub.add_parser("train", parents=[common], help="torchrun of maspo-megatron train")
    p.add_argument("--train-hosts", default=os.environ.get(ENV_TRAIN_HOSTS),
                   help=f"comma list (default: ${ENV_TRAIN_HOSTS})")
    p.add_argument("--recipe", required=True)
    p.add_argument("--nproc-per-node", type=int, required=True)
    p.add_argument("--servers-per-node", type=int, required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--advertise-host", default=None,
                   help="address the servers reach this node at (default: its name in the host list)")
    p.add_argument("--no-wait", action="store_true", help="start torchrun without waiting for the servers")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(fn=run_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except NodeError as e:
        print(f"maspo_megatron.launch.node: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
