"""Per-token log-prob + entropy, forward+backward: time, peak extra memory, saved-for-backward.

Variants, all on the same bf16 ``[tokens, V/tp]`` logits shard, measured in this process (TP=1):

  floor      memory-bound floor: one ``logsumexp`` pass + one elementwise write of [tokens, V/tp]
  ours       ``vocab_parallel_logprobs`` (log-probs + entropy), unchunked
  ours/cK    the same with ``chunk_tokens=K``
  mcore      megatron-core ``vocab_parallel_cross_entropy`` alone (log-probs, no entropy)
  mcore+ent  megatron-core ``vocab_parallel_cross_entropy`` (log-probs) + a separate plain-autograd
             entropy (softmax, sum p*z), as trainers built on megatron-core do

Time and peak extra memory are printed as ratios to ``floor``; saved-for-backward bytes (autograd
saved-tensor hooks, counted once per storage, the input shard included) as a ratio to the bf16
logits shard. CUDA when available (``torch.cuda.max_memory_allocated``), else CPU (peak from the
profiler's allocator events). ``--quick`` runs one tiny size as a sanity check.

    python benchmarks/logprob.py [--quick] [--device cpu|cuda] [--reps N]
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


def variants(chunks: list[int], have_mcore: bool):
    def floor(x, t):
        lse = torch.logsumexp(x, dim=-1)
        return torch.sub(x, lse.unsqueeze(-1))  # the one elementwise [tokens, V/tp] write

    def ours(chunk):
        def f(x, t):
            xr = x.requires_grad_(True)
            lp, ent = vocab_parallel_logprobs(xr, t, chunk_tokens=chunk)
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one tiny size, 1 rep (sanity check)")
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (median)")
    args = ap.parse_args()
    device = args.device
    if device == "cuda":
        torch.cuda.set_device(0)
        name = torch.cuda.get_device_name(0)
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    sizes = QUICK_SIZES if args.quick else (GPU_SIZES if device == "cuda" else CPU_SIZES)
    reps = args.reps or (1 if args.quick else 3)
    chunks = [256] if args.quick else ([1024, 4096] if device == "cuda" else [128, 512])
    have_mcore = init_megatron(device)
    print(f"# device: {name}; torch {torch.__version__}; dtype bf16; TP=1; reps={reps} (median)")
    print("# time/fl, mem/fl: ratio to the floor row; peak_MiB: peak extra memory of one "
          "forward+backward; saved/x: bytes saved for backward / bf16 logits shard bytes")
    print(f"{'tokens':>7} {'V/tp':>7} {'variant':>10} {'time_ms':>9} {'time/fl':>8} "
          f"{'peak_MiB':>9} {'mem/fl':>7} {'saved/x':>8}")
    for n, v in sizes:
        gen = torch.Generator(device=device).manual_seed(0)
        x = (torch.randn(n, v, generator=gen, device=device) * 2).to(torch.bfloat16)
        t = torch.randint(0, v, (n,), generator=gen, device=device)
        xbytes = x.numel() * x.element_size()
        floor_t = floor_m = None
        for label, fn, backward in variants(chunks, have_mcore):
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
                  f"{peak / 2**20:>9.1f} {peak / max(floor_m, 1):>7.2f} {saved:>8.2f}")
        del x, t
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
