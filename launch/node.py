"""What runs on each node of a launch: ``rollout`` (the rollout backend's servers, and the
sglang-router on the first rollout node) or ``train`` (torchrun of ``maspo-megatron train``
attached to those servers).

The job runs it as ``python -m launch.node rollout|train ...`` from the shipped code directory
(nemo-run's ``srun --chdir <job>/code``, or the container's workdir there), so it needs no
install: ``launch/`` and ``maspo_megatron/`` are both in that directory.

Node names come from ``MASPO_ROLLOUT_HOSTS`` / ``MASPO_TRAIN_HOSTS`` and their addresses from
``MASPO_ROLLOUT_ADDRS`` / ``MASPO_TRAIN_ADDRS`` (comma lists in the same order, which the Slurm
job script derives from ``SLURM_JOB_NODELIST_HET_GROUP_{0,1}`` and each node's ``NodeAddr``
with ``scontrol``, which the containers lack), or from the ``--rollout-hosts`` … flags. A node
finds its own rank by its Slurm node name in its list, so nothing depends on how Slurm numbers
het-job components; it listens on, and is reached at, its address in the other list.

Imports the standard library and ``maspo_megatron.rollout`` only (torch, no megatron): the
rollout side runs in the SGLang container.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import signal
import socket
import sys
import time

from maspo_megatron.rollout.backend import ServerSpec, get_backend
from maspo_megatron.rollout.servers import RouterManager, ServerManager

ENV_ROLLOUT_HOSTS = "MASPO_ROLLOUT_HOSTS"
ENV_TRAIN_HOSTS = "MASPO_TRAIN_HOSTS"
ENV_ROLLOUT_ADDRS = "MASPO_ROLLOUT_ADDRS"
ENV_TRAIN_ADDRS = "MASPO_TRAIN_ADDRS"
ROUTER_HEALTH = "/health_generate"  # the router's /health answers before any worker registered
SERVERS_FILE = "servers.json"
"""Written by each rollout node into its log directory: its servers' URLs and process ids."""


class NodeError(RuntimeError):
    """A node cannot start its part of the job; the message says which input is wrong."""


def parse_hosts(text: str | None, what: str, env: str) -> list[str]:
    hosts = [h.strip() for h in (text or "").split(",") if h.strip()]
    if not hosts:
        raise NodeError(f"no {what} hostnames: {env} is unset or empty (the Slurm job script sets it "
                        f"from its het-group node list); pass --{what}-hosts h1,h2,...")
    return hosts


def parse_addrs(text: str | None, hosts: list[str], what: str) -> list[str]:
    """The nodes' addresses, one per host (default: the host names themselves)."""
    addrs = [a.strip() for a in (text or "").split(",") if a.strip()]
    if not addrs:
        return list(hosts)
    if len(addrs) != len(hosts):
        raise NodeError(f"{len(addrs)} {what} addresses {addrs} for {len(hosts)} {what} hosts {hosts}")
    return addrs


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


def _loopback_by_name(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr == "localhost"


def bind_address(addr: str) -> str:
    """The IP this node listens on for ``addr`` (its cluster address), never a wildcard."""
    try:
        ip = socket.gethostbyname(addr)
    except OSError as e:
        raise NodeError(f"cannot resolve this node's address {addr!r}: {e}; pass --bind-host") from None
    if ipaddress.ip_address(ip).is_loopback and not _loopback_by_name(addr):
        print(f"[node] warning: {addr} resolves to the loopback address {ip} here; other nodes "
              "cannot reach servers bound there (fix /etc/hosts or pass --bind-host)",
              file=sys.stderr, flush=True)
    return ip


def server_urls(rollout_addrs: list[str], servers_per_node: int, server_port: int) -> list[str]:
    """Every server of the job: ``servers_per_node`` consecutive ports on each rollout node."""
    return [f"http://{a}:{server_port + i}" for a in rollout_addrs for i in range(servers_per_node)]


def router_url(rollout_addrs: list[str], router_port: int) -> str:
    return f"http://{rollout_addrs[0]}:{router_port}"


def train_command(*, rollout_addrs: list[str], train_addrs: list[str], rank: int,
                  nproc_per_node: int, servers_per_node: int, server_port: int, router_port: int,
                  master_port: int, recipe: str, overrides: list[str],
                  python: str = sys.executable) -> list[str]:
    """torchrun on one training node; the trainer attaches to the job's servers and router.

    ``weight_sync.master_address`` is this node's own address: it is used only by the weight-sync
    senders (one per pipeline stage, possibly on different nodes), each of which hosts the
    rendezvous that the servers connect to.
    """
    return [
        python, "-m", "torch.distributed.run", f"--nnodes={len(train_addrs)}",
        f"--nproc-per-node={nproc_per_node}", f"--node-rank={rank}",
        f"--master-addr={train_addrs[0]}", f"--master-port={master_port}",
        "-m", "maspo_megatron.cli", "train", "--recipe", recipe, *overrides,
        f"rollout.server_urls={json.dumps(server_urls(rollout_addrs, servers_per_node, server_port))}",
        f"rollout.router_url={router_url(rollout_addrs, router_port)}",
        f"weight_sync.master_address={train_addrs[rank]}",
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


def _write_servers_file(log_dir: str, servers: ServerManager, router: RouterManager | None) -> None:
    entries = [{"role": "server", "url": p.url, "pid": p.proc.pid} for p in servers.procs]
    if router is not None:
        entries += [{"role": "router", "url": p.url, "pid": p.proc.pid} for p in router.procs]
    tmp = os.path.join(log_dir, SERVERS_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(entries, f)
    os.replace(tmp, os.path.join(log_dir, SERVERS_FILE))


def run_rollout(args) -> int:
    hosts = parse_hosts(args.rollout_hosts, "rollout", ENV_ROLLOUT_HOSTS)
    addrs = parse_addrs(args.rollout_addrs, hosts, "rollout")
    rank = node_rank(hosts, args.node_rank)
    try:
        spec = ServerSpec(**json.loads(args.server_spec))
    except (ValueError, TypeError) as e:
        raise NodeError(f"--server-spec is not a ServerSpec as JSON: {e}") from None
    if args.num_gpus % spec.tp_size:
        raise NodeError(f"the servers' tp_size {spec.tp_size} must divide --num-gpus {args.num_gpus}")
    per_node = args.num_gpus // spec.tp_size
    backend = get_backend(args.engine)
    bind = args.bind_host or bind_address(addrs[rank])

    def command(port: int, host: str):
        index = port - args.server_port
        gpu = index * spec.tp_size if spec.device == "cuda" else None
        return backend.server_command(dataclasses.replace(spec, base_gpu_id=gpu), port, host)

    log_dir = os.path.join(args.log_dir, hosts[rank])
    os.makedirs(log_dir, exist_ok=True)
    servers = ServerManager(command, per_node, host=bind,
                            ports=[args.server_port + i for i in range(per_node)],
                            startup_timeout_s=args.startup_timeout, log_dir=log_dir,
                            health_path=backend.health_path)
    router = None
    _exit_on_sigterm()
    try:
        servers.start()
        print(f"[rollout node {rank}] {per_node} {args.engine} server(s) ({spec.device}) healthy on "
              f"{hosts[rank]} at {bind}", flush=True)
        if rank == 0:
            urls = server_urls(addrs, per_node, args.server_port)
            ServerManager.attach(urls, startup_timeout_s=args.startup_timeout,
                                 health_path=backend.health_path).wait_healthy(urls)
            router = RouterManager(urls, host=bind, port=args.router_port, log_dir=log_dir,
                                   startup_timeout_s=args.startup_timeout)
            router.start()
            print(f"[rollout node 0] router on {router_url(addrs, args.router_port)} over {len(urls)} "
                  "servers", flush=True)
        _write_servers_file(log_dir, servers, router)
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
    rollout_addrs = parse_addrs(args.rollout_addrs, rollout_hosts, "rollout")
    train_addrs = parse_addrs(args.train_addrs, train_hosts, "train")
    rank = node_rank(train_hosts, args.node_rank)
    cmd = train_command(rollout_addrs=rollout_addrs, train_addrs=train_addrs, rank=rank,
                        nproc_per_node=args.nproc_per_node, servers_per_node=args.servers_per_node,
                        server_port=args.server_port, router_port=args.router_port,
                        master_port=args.master_port, recipe=args.recipe, overrides=args.overrides)
    if not args.no_wait:
        # Fail with the servers' URLs in the message rather than inside NCCL set-up; costs the
        # overlap of server start-up with the trainer's checkpoint load, once per job.
        wait_for_rollouts(server_urls(rollout_addrs, args.servers_per_node, args.server_port),
                          router_url(rollout_addrs, args.router_port), args.startup_timeout)
    print(f"[train node {rank}] {' '.join(cmd)}", flush=True)
    os.execvp(cmd[0], cmd)
    return 1  # not reached: execvp replaces this process


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.node", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="role", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--rollout-hosts", default=os.environ.get(ENV_ROLLOUT_HOSTS),
                        help=f"comma list of node names (default: ${ENV_ROLLOUT_HOSTS})")
    common.add_argument("--rollout-addrs", default=os.environ.get(ENV_ROLLOUT_ADDRS),
                        help=f"their addresses, same order (default: ${ENV_ROLLOUT_ADDRS}, else the names)")
    common.add_argument("--node-rank", type=int, default=None,
                        help="this node's index in its host list (default: found by node name)")
    common.add_argument("--server-port", type=int, required=True)
    common.add_argument("--router-port", type=int, required=True)
    common.add_argument("--startup-timeout", type=float, default=1800.0,
                        help="seconds to wait for servers and router to become healthy")

    p = sub.add_parser("rollout", parents=[common], help="rollout servers (+ router on node 0)")
    p.add_argument("--engine", default="sglang", help="rollout backend (maspo_megatron.rollout.backend)")
    p.add_argument("--server-spec", required=True, help="the servers' ServerSpec as JSON")
    p.add_argument("--num-gpus", type=int, required=True,
                   help="GPUs of this node for servers (servers = num_gpus / tp_size)")
    p.add_argument("--bind-host", default=None,
                   help="address servers and router listen on (default: this node's address)")
    p.add_argument("--log-dir", required=True)
    p.add_argument("--poll-s", type=float, default=2.0, help="how often to check the servers are alive")
    p.set_defaults(fn=run_rollout)

    p = sub.add_parser("train", parents=[common], help="torchrun of maspo-megatron train")
    p.add_argument("--train-hosts", default=os.environ.get(ENV_TRAIN_HOSTS),
                   help=f"comma list of node names (default: ${ENV_TRAIN_HOSTS})")
    p.add_argument("--train-addrs", default=os.environ.get(ENV_TRAIN_ADDRS),
                   help=f"their addresses, same order (default: ${ENV_TRAIN_ADDRS}, else the names)")
    p.add_argument("--recipe", required=True)
    p.add_argument("--nproc-per-node", type=int, required=True)
    p.add_argument("--servers-per-node", type=int, required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--no-wait", action="store_true", help="start torchrun without waiting for the servers")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(fn=run_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except NodeError as e:
        print(f"launch.node: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
