"""Per-token log-prob + entropy, forward+backward: time, peak extra memory, saved-for-backward.

Variants, all on the same bf16 ``[tokens, V/tp]`` logits shard, measured in this process (TP=1):

  floor      memory-bound floor: one ``logsumexp`` pass + one elementwise write of [tokens, V/tp]
  ours       ``vocab_parallel_logprobs`` (log-probs + entropy), unchunked, default backend: the
             fused Triton kernels on CUDA (which do not chunk), the PyTorch path on CPU
  ours/cK    the same with ``chunk_tokens=K``
  torch      CUDA only: ``backend="torch"`` (the PyTorch reference path), unchunked
  torch/cK   the same with ``chunk_tokens=K``
  mcore      megatron-core ``vocab_parallel_cross_entropy`` alone (log-probs, no entropy)
  mcore+ent  megatron-core ``vocab_parallel_cross_entropy`` (log-probs) + a separate plain-autograd
             entropy (softmax, sum p*z), as trainers built on megatron-core do

Time and peak extra memory are printed as ratios to ``floor``; saved-for-backward bytes (autograd
saved-tensor hooks, counted once per storage, the input shard included) as a ratio to the bf16
logits shard; ``3x/s`` is three shard sizes (forward read, backward read + gradient write: the
least any forward+backward moves) over the time, in GB/s. CUDA when available
(``torch.cuda.max_memory_allocated``), else CPU (peak from the profiler's allocator events).
``--quick`` runs one tiny size as a sanity check.

On CUDA a last table times the two Triton kernels alone on the largest size for a few
(BLOCK_V, num_warps) launch configurations, as GB/s of the bytes each must move, to tune
``triton_kernels`` defaults (``--no-sweep`` skips it).

    python benchmarks/logprob.py [--quick] [--device cpu|cuda] [--reps N] [--no-sweep]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist

from maspo_megatron.ops import vocab_parallel_logprobs
from maspo_megatron.ops.vocab_parallel import use_triton

GPU_SIZES = [(16384, 32768), (65536, 16384), (65536, 32768), (65536, 131072)]
CPU_SIZES = [(512, 8192), (2048, 8192), (1024, 32768)]
QUICK_SIZES = [(64, 1024)]


def init_megatron(device: str) -> bool:
    """A 1-process group and megatron-core TP=1 state; False if megatron-core cannot be set up."""
    try:
        from megatron.core import parallel_state
    except Exception as e:  # noqa: BLE001 - reported, the other variants still run
        print(f"# megatron-core unavailable ({type(e).__name__}: {e}); mcore+ent skipped")
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    return True


def entropy_autograd(logits: torch.Tensor) -> torch.Tensor:
    """The usual separate entropy: plain autograd over fp32 softmax (what mcore users add)."""
    z = logits.float()
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)


def variants(chunks: list[int], torch_chunks: list[int], have_mcore: bool):
    def floor(x, t):
        lse = torch.logsumexp(x, dim=-1)
        return torch.sub(x, lse.unsqueeze(-1))  # the one elementwise [tokens, V/tp] write

    def ours(chunk, backend=None):
        def f(x, t):
            xr = x.requires_grad_(True)
            lp, ent = vocab_parallel_logprobs(xr, t, chunk_tokens=chunk, backend=backend)
            return lp, ent
        return f

    def mcore(with_entropy):
        def f(x, t):
            from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

            xr = x.requires_grad_(True)
            lp = -vocab_parallel_cross_entropy(xr, t)
            return lp, (entropy_autograd(xr) if with_entropy else None)
        return f

    out = [("floor", floor, False), ("ours", ours(None), True)]
    out += [(f"ours/c{c}", ours(c), True) for c in chunks]
    if torch_chunks:
        out += [("torch", ours(None, "torch"), True)]
        out += [(f"torch/c{c}", ours(c, "torch"), True) for c in torch_chunks]
    if have_mcore:
        out += [("mcore", mcore(False), True), ("mcore+ent", mcore(True), True)]
    return out


def run_once(fn, x, t, backward: bool):
    x = x.detach()
    outs = fn(x, t)
    if backward:
        lp, ent = outs
        if ent is None:
            lp.sum().backward()
        else:
            torch.autograd.backward([lp, ent], [torch.ones_like(lp), torch.full_like(ent, 0.1)])
        x.grad = None


def cpu_peak_bytes(fn) -> int:
    """Peak of live bytes allocated during fn(), from the profiler's CPU allocator events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Raw allocator events (one per allocation / free, signed bytes), in time order.
    deltas = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    cur = peak = 0
    for _, d in deltas:
        cur += d
        peak = max(peak, cur)
    return peak


def saved_bytes(fn, x, t) -> int:
    storages = {}

    def pack(s):
        storages[s.untyped_storage().data_ptr()] = s.untyped_storage().nbytes()
        return s

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
        outs = fn(x.detach(), t)
    del outs
    return sum(storages.values())


def measure(fn, x, t, backward, device, reps):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    run_once(fn, x, t, backward)  # warm-up
    sync()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once(fn, x, t, backward)
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = cpu_peak_bytes(lambda: run_once(fn, x, t, backward))
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        run_once(fn, x, t, backward)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak


def kernel_sweep(x, t, reps):
    """Times row_stats / logits_grad alone per launch configuration, as GB/s of required bytes."""
    from maspo_megatron.ops import triton_kernels as tk
    from maspo_megatron.ops.vocab_parallel import combine_stats

    n, v = x.shape
    xbytes = x.numel() * x.element_size()
    print(f"# Triton kernels alone on [{n}, {v}] bf16, temperature 1, entropy on; GB/s of the bytes "
          "each must move (stats: 1 read; grad: 1 read + 1 write); median of "
          f"{reps}; default (BLOCK_V, warps) here: {tk.launch_config(v, None, None)}")
    print("# stats/sN: the stats kernel with N pipeline stages (num_stages of its column loop)")
    print(f"{'BLOCK_V':>8} {'warps':>6} {'stats/s1_ms':>12} {'GB/s':>6} {'stats/s3_ms':>12} "
          f"{'GB/s':>6} {'grad_ms':>8} {'GB/s':>6}")
    stats = tk.row_stats(x, t, v, 1.0, True)
    m, log_s, w_over_s, _ = combine_stats(stats, None, True)
    g_lp, g_h = torch.ones(n, device=x.device), torch.full((n,), 0.1, device=x.device)
    out = torch.empty_like(x)
    for block_v, warps in [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16)]:
        cfg = dict(block_v=block_v, num_warps=warps)
        t_s1, t_s3 = (time_cuda(lambda: tk.row_stats(
            x, t, v, 1.0, True, out=stats, num_stages=st, **cfg), reps) for st in (1, 3))
        t_grad = time_cuda(lambda: tk.logits_grad(
            x, t, v, 1.0, m, log_s, w_over_s, g_lp, g_h, out=out, **cfg), reps)
        print(f"{block_v:>8} {warps:>6} {t_s1 * 1e3:>12.2f} {xbytes / t_s1 / 1e9:>6.0f} "
              f"{t_s3 * 1e3:>12.2f} {xbytes / t_s3 / 1e9:>6.0f} {t_grad * 1e3:>8.2f} "
              f"{2 * xbytes / t_grad / 1e9:>6.0f}")


def time_cuda(fn, reps):
    fn()  # compile / warm up
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one tiny size, 1 rep (sanity check)")
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (median)")
    ap.add_argument("--no-sweep", action="store_true",
                    help="CUDA: skip the Triton launch-configuration table")
    args = ap.parse_args()
    device = args.device
    if device == "cuda":
        torch.cuda.set_device(0)
        name = torch.cuda.get_device_name(0)
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    sizes = QUICK_SIZES if args.quick else (GPU_SIZES if device == "cuda" else CPU_SIZES)
    reps = args.reps or (1 if args.quick else 3)
    # On CUDA ours does not chunk (Triton kernels): one chunked row shows it; the PyTorch path
    # is timed with the chunk sizes it needs there.
    if device == "cuda":
        chunks, torch_chunks = [256 if args.quick else 4096], [256] if args.quick else [1024, 4096]
    else:
        chunks, torch_chunks = ([256] if args.quick else [128, 512]), []
    have_mcore = init_megatron(device)
    probe = torch.zeros(1, 1, dtype=torch.bfloat16, device=device)
    backend = "triton (fused kernels)" if use_triton(probe, None) else "torch"
    print(f"# device: {name}; torch {torch.__version__}; dtype bf16; TP=1; reps={reps} (median); "
          f"ours = backend {backend}")
    print("# time/fl, mem/fl: ratio to the floor row; peak_MiB: peak extra memory of one "
          "forward+backward; saved/x: bytes saved for backward / bf16 logits shard bytes; "
          "3x/s: 3 x shard bytes / time, GB/s")
    print(f"{'tokens':>7} {'V/tp':>7} {'variant':>10} {'time_ms':>9} {'time/fl':>8} "
          f"{'peak_MiB':>9} {'mem/fl':>7} {'saved/x':>8} {'3x/s':>7}")
    for n, v in sizes:
        gen = torch.Generator(device=device).manual_seed(0)
        x = (torch.randn(n, v, generator=gen, device=device) * 2).to(torch.bfloat16)
        t = torch.randint(0, v, (n,), generator=gen, device=device)
        xbytes = x.numel() * x.element_size()
        floor_t = floor_m = None
        for label, fn, backward in variants(chunks, torch_chunks, have_mcore):
            try:
                sec, peak = measure(fn, x, t, backward, device, reps)
                saved = saved_bytes(fn, x, t) / xbytes if backward else float("nan")
            except torch.OutOfMemoryError:
                print(f"{n:>7} {v:>7} {label:>10}  OOM")
                torch.cuda.empty_cache()
                continue
            except Exception as e:  # noqa: BLE001 - e.g. hard-coded CUDA inside megatron-core
                print(f"{n:>7} {v:>7} {label:>10}  failed: {type(e).__name__}: {e}")
                continue
            if label == "floor":
                floor_t, floor_m = sec, peak
            print(f"{n:>7} {v:>7} {label:>10} {sec * 1e3:>9.2f} {sec / floor_t:>8.2f} "
                  f"{peak / 2**20:>9.1f} {peak / max(floor_m, 1):>7.2f} {saved:>8.2f} "
                  f"{3 * xbytes / sec / 1e9:>7.0f}")
        if device == "cuda" and backend != "torch" and not args.no_sweep and (n, v) == sizes[-1]:
            kernel_sweep(x, t, reps)
        del x, t
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
