"""Process groups, device choice, and the CPU execution mode for megatron-core."""

# First, before anything here imports megatron-core: its import-time warnings (runtime/noise.py).
from maspo_megatron.runtime.noise import quiet_upstream_noise

quiet_upstream_noise()

from maspo_megatron.runtime.cpu_mode import cpu_mode_enabled, enable_cpu_mode
from maspo_megatron.runtime.parallel import ParallelConfig, destroy_parallel, device, initialize_parallel

__all__ = [
    "ParallelConfig",
    "cpu_mode_enabled",
    "destroy_parallel",
    "device",
    "enable_cpu_mode",
    "initialize_parallel",
    "quiet_upstream_noise",
]
