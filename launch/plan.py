"""A launch plan: the recipe's config checked against the nodes it will get, before submission.

Everything a user can get wrong on the command line fails here with a message that names the
flag or config key, instead of minutes later on a cluster; so does a layout whose GPUs cannot hold
it (``maspo-megatron plan``'s memory plan, :func:`check_memory`), naming the dominant term.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from maspo_megatron.cli import recipe_module
from maspo_megatron.config import ConfigError, apply_overrides
from maspo_megatron.rollout.backend import ServerSpec

LAUNCHER_KEYS = ("rollout.server_urls", "rollout.router_url", "weight_sync.master_address")
"""Config keys the launcher derives from the job's hostnames; users must not set them."""


class LaunchError(ConfigError):
    """A launch that cannot work as asked; the message names the flag or config key."""


@dataclass(frozen=True)
class Ports:
    server: int = 30000
    """First SGLang server port on each rollout node (server i listens on ``server + i``)."""
    router: int = 30100
    """sglang-router port on the first rollout node."""
    master: int = 29500
    """torchrun master port on the first training node."""
    weight_sync: int = 0
    """Weight-update rendezvous port on the training nodes (pipeline stage i uses ``+ i``);
    0: the recipe's ``weight_sync.master_port`` (whose 0 means a free port per sender)."""


@dataclass(frozen=True)
class LaunchPlan:
    recipe: str
    overrides: tuple[str, ...]
    model_path: str
    output_dir: str
    train_nodes: int
    train_gpus_per_node: int
    rollout_nodes: int
    rollout_gpus_per_node: int
    engine: str
    server: ServerSpec
    """What each rollout server is asked (the recipe's ``rollout`` section); the node sets
    ``base_gpu_id`` per server."""
    startup_timeout_s: float
    ports: Ports

    @property
    def sglang_tp(self) -> int:
        return self.server.tp_size

    @property
    def servers_per_node(self) -> int:
        return self.rollout_gpus_per_node // self.server.tp_size

    @property
    def train_overrides(self) -> tuple[str, ...]:
        """The user's overrides plus the ones the launcher's flags stand for."""
        extra = []
        if self.ports.weight_sync and not any(o.split("=", 1)[0].strip() == "weight_sync.master_port"
                                              for o in self.overrides):
            extra.append(f"weight_sync.master_port={self.ports.weight_sync}")
        return (*self.overrides, *extra)


def require_positive(flag: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LaunchError(f"{flag} must be a positive integer, got {value!r}")


def make_plan(recipe: str, overrides: list[str] | tuple[str, ...], *, train_nodes: int,
              train_gpus_per_node: int, rollout_nodes: int, rollout_gpus_per_node: int,
              ports: Ports = Ports(), gpu_gb: float | None = 80.0) -> LaunchPlan:
    """Loads ``recipe`` with ``overrides`` and checks it fits the nodes; raises LaunchError.

    ``gpu_gb``: GPU memory in GiB; the memory plan (:func:`check_memory`) must fit it (None skips).

    A recipe whose model or layout is not implemented raises its NotImplementedError.
    """
    require_positive("--train-nodes", train_nodes)
    require_positive("train GPUs per node", train_gpus_per_node)
    require_positive("--rollout-nodes", rollout_nodes)
    require_positive("rollout GPUs per node", rollout_gpus_per_node)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in LAUNCHER_KEYS:
            raise LaunchError(f"{key} is set by the launcher from the job's hostnames; remove "
                              f"{item!r} from the overrides")
    module = recipe_module(recipe)
    cfg = apply_overrides(module.build(), list(overrides))
    if not cfg.model.path:
        raise LaunchError(f"recipe {recipe}: model.path is empty; pass model.path=/path/to/hf_model "
                          "(a directory the job's nodes can read)")
    if not cfg.data.train_path:
        raise LaunchError(f"recipe {recipe}: data.train_path is empty; pass "
                          "data.train_path=/path/to/train.parquet (or .jsonl)")
    world = train_nodes * train_gpus_per_node
    try:
        cfg.parallel.validate(world)
    except ValueError as e:
        raise LaunchError(f"recipe {recipe}: its parallel layout does not fit {train_nodes} training "
                          f"node(s) x {train_gpus_per_node} GPUs = {world} ranks: {e}") from None
    tp = cfg.rollout.sglang_tp
    if tp < 1 or rollout_gpus_per_node % tp:
        raise LaunchError(f"rollout.sglang_tp={tp} must divide the {rollout_gpus_per_node} rollout GPUs "
                          "per node (servers do not span nodes)")
    if cfg.weight_sync.mode == "colocated":
        raise LaunchError("weight_sync.mode=colocated needs trainer and servers on the same GPUs; these "
                          "launchers give them separate GPUs (use distributed or disk)")
    server_ports = range(ports.server, ports.server + rollout_gpus_per_node // tp)
    named = {"router": ports.router, "torchrun master": ports.master}
    if ports.weight_sync:
        named["weight sync"] = ports.weight_sync
    taken = list(named.values())
    if any(p in server_ports for p in taken) or len(set(taken)) < len(taken):
        raise LaunchError(f"ports collide: servers use {server_ports.start}-{server_ports.stop - 1}, "
                          + ", ".join(f"{n} {p}" for n, p in named.items()))
    if gpu_gb:
        check_memory(recipe, module, cfg, train_gpus=world, rollout_gpus=rollout_nodes * rollout_gpus_per_node,
                     gpu_gb=gpu_gb)
    return LaunchPlan(
        recipe=recipe, overrides=tuple(overrides), model_path=cfg.model.path,
        output_dir=cfg.output_dir, train_nodes=train_nodes, train_gpus_per_node=train_gpus_per_node,
        rollout_nodes=rollout_nodes, rollout_gpus_per_node=rollout_gpus_per_node,
        engine=cfg.rollout.engine, server=cfg.rollout.server_spec(cfg.model.path),
        startup_timeout_s=cfg.rollout.startup_timeout_s, ports=ports,
    )


def check_memory(recipe: str, module, cfg, *, train_gpus: int, rollout_gpus: int, gpu_gb: float):
    """``maspo-megatron plan`` for this launch (``maspo_megatron/megatron/memory.py``): raises
    LaunchError naming each GPU kind that does not fit and its dominant term. Skipped (None)
    when this machine has no description of the model: ``model.path`` unreadable here and no
    ``HF_CONFIG`` in the recipe."""
    from maspo_megatron.megatron.memory import MemoryPlanError, plan_recipe, recipe_model_config

    try:
        recipe_model_config(cfg, module)
    except MemoryPlanError:
        return None
    memory = plan_recipe(cfg, module, train_gpus=train_gpus, rollout_gpus=rollout_gpus, gpu_gib=gpu_gb)
    if not memory.fits:
        raise LaunchError(f"recipe {recipe}: {memory.verdict()} (`maspo-megatron plan --recipe {recipe}` "
                          "prints every term; --gpu-gb sets the GPU size)")
    return memory


def rollout_args(plan: LaunchPlan, extra: list[str] = ()) -> list[str]:
    """Arguments of ``launch.node rollout`` for this plan; ``extra`` node options (e.g.
    ``--rollout-hosts``) are added, else hosts come from the environment."""
    return ["rollout", "--engine", plan.engine,
            "--server-spec", json.dumps(dataclasses.asdict(plan.server), separators=(",", ":")),
            "--num-gpus", str(plan.rollout_gpus_per_node),
            "--server-port", str(plan.ports.server), "--router-port", str(plan.ports.router),
            "--startup-timeout", str(plan.startup_timeout_s),
            "--log-dir", f"{plan.output_dir}/rollout_logs", *extra]


def train_args(plan: LaunchPlan, extra: list[str] = ()) -> list[str]:
    """Arguments of ``launch.node train`` for this plan; ``extra`` node options are added before
    the config overrides."""
    return ["train", "--recipe", plan.recipe, "--nproc-per-node", str(plan.train_gpus_per_node),
            "--servers-per-node", str(plan.servers_per_node), "--server-port", str(plan.ports.server),
            "--router-port", str(plan.ports.router), "--master-port", str(plan.ports.master),
            "--startup-timeout", str(plan.startup_timeout_s), *extra, "--", *plan.train_overrides]
