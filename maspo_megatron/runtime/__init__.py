"""Process groups, device choice, and the CPU execution mode for megatron-core."""

from maspo_megatron.runtime.cpu_mode import cpu_mode_enabled, enable_cpu_mode
from maspo_megatron.runtime.parallel import ParallelConfig, destroy_parallel, device, initialize_parallel

__all__ = [
    "ParallelConfig",
    "cpu_mode_enabled",
    "destroy_parallel",
    "device",
    "enable_cpu_mode",
    "initialize_parallel",
]
