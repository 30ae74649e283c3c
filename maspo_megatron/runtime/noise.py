"""Upstream start-up noise: what megatron-core and torch print on every rank of every run.

Without these filters a 2-rank CPU run printed about twenty lines per start before the first step
(each rank its own copy). Each entry below names the message, where it comes from and why
dropping it loses nothing. Two rules:

- a message the user can act on is kept, on global rank 0 only (the others print the same);
- a message nobody running this trainer can act on (a deprecation notice addressed to
  megatron-core's callers, or a GPU-only fallback on a machine without a GPU) is dropped.

``quiet_upstream_noise`` runs when ``maspo_megatron.runtime`` is imported, which is before any of
our code imports megatron (megatron-core emits most of these at import time), and again at the
top of ``initialize_parallel`` with the real rank (``warnings.catch_warnings`` blocks, e.g.
pytest's, restore the filters they found). It is idempotent.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

# Deprecation and developer notices, dropped everywhere: they are addressed to megatron-core's
# callers (this package's code), not to someone running it, and say nothing about the run.
DEPRECATION_WARNINGS = (
    # megatron-core 0.19 transformer_config.py: a default of its own CUDA-graph options.
    "full scope is deprecated",
    # megatron-core 0.19 models/mimo (imported by megatron.core, unused here).
    "MimoModelConfig is experimental",
    # torch 2.14 c10d_logger.py: megatron's DDP / distributed optimizer call these collectives.
    r"`torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
)
DEPRECATION_LOGS = {
    # megatron-core 0.19 gpt_model.py: GPTModel -> HybridModel migration notice.
    "megatron.core.models.gpt.gpt_model": ("GPTModel IS DEPRECATED",),
    # megatron-core 0.19 distributed_data_parallel.py: asks its caller (megatron/actor.py) to
    # pass a pre-computed parameter layout; the layout it computes itself is the same one.
    "megatron.core.distributed.distributed_data_parallel": (
        "DistributedDataParallel: full_param_layout not provided",),
    # megatron-core 0.19 dist_checkpointing/strategies/torch.py: its "mcore" async-save
    # strategy is deprecated; checkpoint.py saves synchronously.
    "megatron.core.dist_checkpointing.strategies.torch": ("MCore's async save is deprecated",),
    # torch 2.14 utils/cpp_extension.py, on import, on any machine without a CUDA runtime:
    # says that CUDA_HOME would be used to build CUDA extensions, which nothing here builds.
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
}

# Fallbacks to plain-torch code when the GPU-only fused libraries are missing (megatron-core
# 0.19 optimizer/__init__.py, optimizer.py, clip_grads.py, megatron_fsdp/mixed_precision.py,
# models/backends.py, gpt_layer_specs.py; tensor_parallel/layers.py for the env variable).
# On CPU nothing can be done about them (Transformer Engine and Apex are CUDA-only; never install
# the bare transformer-engine package on CPU, DESIGN.md): dropped. On a GPU they point at a
# slower path the user can fix (the NGC PyTorch/NeMo container has both): kept on rank 0.
GPU_ONLY_WARNINGS = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "When using async grad allreduce it is recommended to set the environment variable "
    "CUDA_DEVICE_MAX_CONNECTIONS",
)


class _DropMessages(logging.Filter):
    """Drops records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def _rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


def quiet_upstream_noise(rank: int | None = None) -> None:
    """Installs the filters above; ``rank`` defaults to torchrun's ``RANK`` (0 without it)."""
    rank = _rank_from_env() if rank is None else rank
    for pattern in DEPRECATION_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if not torch.cuda.is_available() or rank != 0:
        for pattern in GPU_ONLY_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
    for name, prefixes in DEPRECATION_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))
