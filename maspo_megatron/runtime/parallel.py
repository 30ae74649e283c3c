"""Process groups: torch.distributed from torchrun's environment, then megatron's parallel_state.

This is the one place that creates process groups. Everything else asks megatron's
``parallel_state`` (or receives a group object) for the group it needs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from maspo_megatron.runtime.cpu_mode import enable_cpu_mode
from maspo_megatron.runtime.noise import quiet_upstream_noise


@dataclass
class ParallelConfig:
    """Model-parallel layout. The data-parallel size is what remains of the world size."""

    tp: int = 1
    """Tensor-parallel size (splits attention heads, MLP and the vocabulary)."""
    pp: int = 1
    """Pipeline-parallel size (splits layers into stages)."""
    vpp: int | None = None
    """Virtual pipeline stages (model chunks) per pipeline rank, for the interleaved 1F1B
    schedule; None for the plain 1F1B. Needs ``pp >= 2`` and ``num_hidden_layers`` divisible by
    ``pp * vpp``; each data-parallel rank then needs at least ``pp`` sequences per mini-batch."""
    cp: int = 1
    """Context-parallel size (splits long sequences)."""
    ep: int = 1
    """Expert-parallel size (MoE models)."""
    etp: int | None = None
    """Expert tensor-parallel size; None follows ``tp``."""
    seed: int = 1234
    """Seed of megatron's model-parallel RNG tracker (weight init, dropout)."""
    timeout_minutes: int = 30
    """Collective timeout: a hung peer fails the job instead of stalling it forever."""

    def __post_init__(self):
        self._check_sizes()
        for key in ("vpp", "etp"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"parallel.{key} must be None or a positive integer, got {value!r}")
        if self.vpp is not None and self.pp < 2:
            # megatron-core builds every layer into each chunk when pp == 1.
            raise ValueError(f"parallel.vpp={self.vpp} needs parallel.pp >= 2 (virtual stages interleave "
                             f"pipeline stages), got parallel.pp={self.pp}; leave parallel.vpp None")
        if not self.timeout_minutes > 0:
            raise ValueError(f"parallel.timeout_minutes must be > 0, got {self.timeout_minutes!r}")

    def _check_sizes(self) -> None:
        for key in ("tp", "pp", "cp", "ep"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel.{key} must be a positive integer, got {value!r}")

    def validate(self, world_size: int) -> int:
        """Checks the layout against the world size and returns the data-parallel size."""
        self._check_sizes()
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = "
                f"{self.tp}*{self.pp}*{self.cp} = {model_parallel}"
            )
        dp = world_size // model_parallel
        if (dp * self.cp) % self.ep:
            raise ValueError(f"parallel.ep={self.ep} must divide dp*cp = {dp * self.cp}")
        return dp


def device() -> torch.device:
    """The device this rank computes on: its local CUDA device when present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize_parallel(cfg: ParallelConfig) -> None:
    """Initialises torch.distributed (torchrun env vars) and megatron's parallel state.

    On a machine without CUDA this uses gloo and switches on the CPU execution mode; with CUDA
    it uses NCCL on ``LOCAL_RANK``'s device. Safe to call once per process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    quiet_upstream_noise(rank)  # before megatron's import-time warnings
    from megatron.core import parallel_state, tensor_parallel

    cfg.validate(world_size)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        enable_cpu_mode()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            world_size=world_size,
            rank=rank,
            timeout=datetime.timedelta(minutes=cfg.timeout_minutes),
        )
    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel state is already initialised in this process")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        virtual_pipeline_model_parallel_size=cfg.vpp,
        context_parallel_size=cfg.cp,
        expert_model_parallel_size=cfg.ep,
        expert_tensor_parallel_size=cfg.etp,
        distributed_timeout_minutes=cfg.timeout_minutes,
        # The distributed optimizer asks for the gloo data-parallel groups even on CPU.
        create_gloo_process_groups=True,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed)


def destroy_parallel() -> None:
    """Tears down megatron's groups and the default process group (tests, clean exits)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
