"""The command line and environment of one SGLang 0.5.23 server, on GPUs or on CPUs.

CPU (``ServerSpec.device="cpu"``: the demo, CI, a laptop) runs SGLang's own CPU engine: the
real server, scheduler and model code, with the flags below (each needed on CPU, found by running
it) and ``SGLANG_USE_CPU_ENGINE=1`` (without it ``is_cpu()`` is false and start-up imports vLLM
ops). That engine calls sgl-kernel's C++ CPU build, which has no wheel; when no real
``sgl_kernel`` is importable, the pure-torch stand-in in ``cpu_shim/`` is put on the *server's*
``PYTHONPATH`` only (see its docstring for what it implements and when to drop it).
"""

from __future__ import annotations

import sys

from maspo_megatron.rollout.backend import ServerSpec
from maspo_megatron.rollout.sglang.cpu_shim import SHIM_DIR, cpu_engine_env  # noqa: F401

# SGLang's CPU engine as verified on this project's CI machine (2-core x86, no GPU).
CPU_FLAGS = [
    "--device", "cpu",
    "--attention-backend", "torch_native",  # the only attention backend without GPU kernels
    "--sampling-backend", "pytorch",  # the default (flashinfer) is CUDA-only
    "--disable-cuda-graph",
    # Off as everything here was verified with it off; a quick try with it on served correctly
    # and called no stand-in op, so it is a candidate for speeding up n samples per prompt.
    "--disable-radix-cache",
    "--disable-overlap-schedule",  # the overlap scheduler uses CUDA streams
    "--skip-server-warmup",  # the warm-up request takes minutes on 2 cores
]
CPU_MAX_TOTAL_TOKENS = 16384  # KV cache in tokens; the CPU engine sizes it from RAM otherwise


def server_command(spec: ServerSpec, port: int, host: str, python: str = sys.executable
                   ) -> tuple[list[str], dict[str, str]]:
    if spec.tp_size < 1:
        raise ValueError(f"rollout.sglang_tp must be >= 1, got {spec.tp_size}")
    if spec.mem_fraction_static is not None and not 0.0 < spec.mem_fraction_static < 1.0:
        raise ValueError(f"rollout.mem_fraction_static must be in (0, 1), got {spec.mem_fraction_static}")
    if spec.device not in ("cuda", "cpu"):
        raise ValueError(f"rollout.device must be 'cuda' or 'cpu', got {spec.device!r}")
    cmd = [python, "-m", "sglang.launch_server", "--model-path", spec.model_path,
           "--tp-size", str(spec.tp_size), "--host", host, "--port", str(port),
           # the trainer sends token ids and reads output ids
           "--skip-tokenizer-init"]
    env: dict[str, str] = {}
    if spec.device == "cpu":
        cmd += CPU_FLAGS + ["--max-total-tokens", str(spec.max_total_tokens or CPU_MAX_TOTAL_TOKENS)]
        # SGLANG_USE_CPU_ENGINE=1, plus the stand-in first on PYTHONPATH when the server's
        # interpreter imports no real sgl_kernel (refused with a CUDA device visible).
        env.update(cpu_engine_env(python))
    elif spec.max_total_tokens:
        cmd += ["--max-total-tokens", str(spec.max_total_tokens)]
    if spec.dtype or spec.device == "cpu":
        # On CPU "auto" would halve an fp32 checkpoint; the trainer's CPU runs are fp32.
        cmd += ["--dtype", spec.dtype or "float32"]
    if spec.mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(spec.mem_fraction_static)]
    if spec.memory_saver:
        cmd.append("--enable-memory-saver")
    if spec.api_key:
        cmd += ["--api-key", spec.api_key]
    if spec.base_gpu_id is not None:
        cmd += ["--base-gpu-id", str(spec.base_gpu_id)]
    return cmd + list(spec.extra_args), env


def check_model(spec: ServerSpec, hf_config: dict) -> None:
    """What SGLang 0.5.23 cannot serve with this spec, said before anything starts."""
    heads = hf_config.get("num_attention_heads")
    kv = hf_config.get("num_key_value_heads") or heads
    tp = spec.tp_size
    if heads and heads % tp:
        raise ValueError(f"rollout.sglang_tp={tp} does not divide the model's {heads} attention heads")
    # SGLang replicates k/v heads when there are fewer than TP ranks, which needs TP to be a
    # multiple of them.
    if kv and kv < tp and tp % kv:
        raise ValueError(f"rollout.sglang_tp={tp} with {kv} key/value heads: SGLang replicates k/v "
                         f"heads only when TP is a multiple of their number")
