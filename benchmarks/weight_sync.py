"""Weight-sync throughput into real SGLang servers: distributed (flattened_bucket broadcast),
distributed + the log-prob proof, and disk, each against a raw broadcast of the same bytes.

Prints seconds and GB/s of a full ``WeightSyncer.sync`` for a synthetic Llama of about
``--size-mb`` megabytes, next to ``torch.distributed.broadcast`` of the same bytes in the same
bucket sizes to the same number of receiver processes, measured in this process with the same
group mechanism. The ratio sync/raw is the protocol's overhead (HTTP, session, packing, loading
into the model, pause/continue; with the proof also its probe prefills on every server). Median
and spread over ``--repeats``.

``--senders 2`` measures pipeline-parallel senders instead: the model's tensors are split in two
stage shares, each held by its own process (as PP=2 stages are), and three paths are timed from
the first sender's process, interleaved: the parallel sync (both senders at once, buckets
interleaved on the token ring, the next bucket prepared while one is sent), the sequential one
(stage 1 starts its own whole sync after stage 0's: the senders-take-turns design this replaced,
with one pause/continue per stage), and a raw broadcast of the same buckets from that process. "its bucket sends only" is the
span of the parallel sync from its first bucket's broadcast to its last bucket's answer (the
rest is pause, session, version, flush, continue and the senders' agreements).

CPU (default): starts ``--num-servers`` real SGLang servers on their CPU engine (gloo). GPU: pass
``--server-urls`` of running SGLang servers and ``--model-path`` of the checkpoint they serve; the
trainer side then uses NCCL from ``cuda:0`` (the raw baseline needs one extra local GPU per
receiver).

    python benchmarks/weight_sync.py --size-mb 256 --bucket-mb 64 --num-servers 1
    python benchmarks/weight_sync.py --size-mb 64 --bucket-mb 8 --num-servers 1 --senders 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import statistics

from maspo_megatron.rollout.backend import ServerSpec, get_backend
from maspo_megatron.rollout.client import RolloutClient
from maspo_megatron.rollout.servers import ServerManager, free_port
from maspo_megatron.rollout.weight_sync import (
    ProofConfig, WeightSyncConfig, WeightSyncer, init_weight_update_group, iter_buckets,
)
from maspo_megatron.weight_publisher import WeightProof


def build_model(size_mb: float, path: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, vocab = 512, 1408, 8192
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((size_mb * 1e6 / 4 - fixed) / per_layer))
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return model


def _receiver(rank, world, port, nbytes_list, backend):
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    group = init_weight_update_group(backend=backend, master_address="127.0.0.1", master_port=port,
                                     rank=rank + 1, world_size=world, group_name="raw_bench",
                                     timeout_s=120)
    for n in [1] + list(nbytes_list):  # 1: the warm-up broadcast
        dist.broadcast(torch.empty(n, dtype=torch.uint8, device=device), src=0, group=group)
    dist.barrier(group=group)
    dist.destroy_process_group(group)


def raw_broadcast(nbytes_list: list[int], receivers: int, backend: str) -> float:
    """Seconds to broadcast buffers of these sizes from this process to ``receivers`` others."""
    port = free_port()
    world = receivers + 1
    ctx = mp.start_processes(_receiver, args=(world, port, nbytes_list, backend),
                             nprocs=receivers, join=False, start_method="spawn")
    device = torch.device("cuda", receivers) if backend == "nccl" else torch.device("cpu")
    group = init_weight_update_group(backend=backend, master_address="127.0.0.1", master_port=port,
                                     rank=0, world_size=world, group_name="raw_bench", timeout_s=120)
    bufs = [torch.ones(n, dtype=torch.uint8, device=device) for n in nbytes_list]
    dist.broadcast(torch.ones(1, dtype=torch.uint8, device=device), src=0, group=group)  # warm-up
    t0 = time.monotonic()
    for b in bufs:
        dist.broadcast(b, src=0, group=group)
    if backend == "nccl":
        torch.cuda.synchronize()
    seconds = time.monotonic() - t0
    dist.barrier(group=group)
    dist.destroy_process_group(group)
    ctx.join()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=128.0)
    ap.add_argument("--bucket-mb", type=float, default=32.0)
    ap.add_argument("--num-servers", type=int, default=1)
    ap.add_argument("--server-urls", nargs="*", default=None)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--senders", type=int, default=1, choices=(1, 2),
                    help="2: PP=2 senders, parallel vs sequential vs raw (see the module docstring)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() // 2))
    tmp = tempfile.mkdtemp(prefix="wsync_bench_")
    if args.server_urls:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model_path)
        manager, urls = None, args.server_urls
    else:
        model = build_model(args.size_mb, os.path.join(tmp, "model"))
        spec = ServerSpec(os.path.join(tmp, "model"), device="cpu")
        backend_impl = get_backend("sglang")
        manager = ServerManager(lambda p, h: backend_impl.server_command(spec, p, h),
                                args.num_servers, startup_timeout_s=600, log_dir=tmp)
        urls = manager.start()
    tensors = list(model.state_dict().items())
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    bucket = int(args.bucket_mb * 1e6)
    backend = "nccl" if torch.cuda.is_available() and args.server_urls else "gloo"
    if args.senders == 2:
        if backend != "gloo":
            raise NotImplementedError("--senders 2 is measured with gloo (CPU) senders only")
        try:
            pipeline_senders(tensors, urls, bucket, args.repeats)
        finally:
            if manager is not None:
                manager.stop()
        return
    if backend == "nccl":
        tensors = [(n, t.cuda()) for n, t in tensors]
    print(f"model {total / 1e6:.1f} MB in {len(tensors)} tensors, bucket {bucket / 1e6:.0f} MB, "
          f"{len(urls)} server(s), backend {backend}")
    proof = WeightProof(ProofConfig(), model.config.vocab_size, 1, ProofConfig().tolerance("fp32"))
    with torch.no_grad():  # the "trainer's" probe log-probs: this process's HF model
        logits = model(input_ids=proof.ids).logits.float()
        ours = torch.log_softmax(logits[:, :-1], -1).gather(-1, proof.ids[:, 1:, None])[..., 0]
    client = RolloutClient(urls)
    sizes = [sum(t.numel() * t.element_size() for _, t in b) for b in iter_buckets(tensors, bucket)]
    times = {k: [] for k in ("raw", "distributed", "distributed + proof", "disk")}
    try:
        syncer = WeightSyncer(urls, WeightSyncConfig(bucket_bytes=bucket, backend=backend))
        syncer.connect()
        disk = WeightSyncer(urls, WeightSyncConfig(mode="disk", disk_dir=tmp))
        # Interleaved, so that machine noise hits every path alike.
        for i in range(args.repeats):
            times["raw"].append(raw_broadcast(sizes, len(urls), backend))
            times["distributed"].append(syncer.sync(iter(tensors), version=f"b{i}").seconds)
            t0 = time.monotonic()
            syncer.sync(iter(tensors), version=f"p{i}")
            proof.compare(ours, client, urls, f"p{i}")
            times["distributed + proof"].append(time.monotonic() - t0)
            times["disk"].append(disk.sync(iter(tensors), version=f"d{i}").seconds)
        syncer.close()
    finally:
        if manager is not None:
            manager.stop()
    raw_label = f"raw broadcast ({backend})"
    _print_table({raw_label if k == "raw" else "sync " + k: v for k, v in times.items()}, total, raw_label)


def _print_table(times: dict[str, list[float]], total: int, raw_key: str) -> None:
    raw = statistics.median(times[raw_key])
    print(f"{'path':<24}{'median s':>10}{'min s':>9}{'max s':>9}{'GB/s':>8}{'vs raw':>8}")
    for label, secs in times.items():
        med = statistics.median(secs)
        print(f"{label:<24}{med:>10.3f}{min(secs):>9.3f}{max(secs):>9.3f}{total / med / 1e9:>8.3f}"
              f"{med / raw:>8.2f}")


def _stage_sender(rank, port, shares, urls, bucket, repeats, out):
    """One PP=2 stage's sender process (gloo, CPU); rank 0 also times the raw baseline."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = WeightSyncConfig(bucket_bytes=bucket, backend="gloo")
    parallel = WeightSyncer(urls, cfg, sender_index=rank, num_senders=2, sender_group=dist.group.WORLD)
    parallel.connect()
    alone = WeightSyncer(urls, cfg)  # the sequential path: this stage's own whole sync

    def in_turns(fn):
        for turn in range(2):
            if turn == rank:
                fn()
            dist.barrier()

    in_turns(alone.connect)
    mine = shares[rank]
    sizes = [sum(t.numel() * t.element_size() for _, t in b)
             for share in shares for b in iter_buckets(share, bucket)]
    times = {"raw": [], "parallel": [], "sequential": [], "transfers": []}

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.monotonic()
        fn()
        dist.barrier()
        return time.monotonic() - t0

    for i in range(repeats):  # interleaved, so that machine noise hits every path alike
        if rank == 0:
            times["raw"].append(raw_broadcast(sizes, len(urls), "gloo"))
        times["parallel"].append(timed(lambda: parallel.sync(iter(mine), version=f"p{i}")))
        sends = [None, None]  # both senders' bucket sends: the span from first start to last end
        dist.all_gather_object(sends, [e for e in parallel.last_stats.timeline if e[0] == "send"])
        times["transfers"].append(max(e[3] for s in sends for e in s) - min(e[2] for s in sends for e in s))
        times["sequential"].append(timed(lambda: in_turns(lambda: alone.sync(iter(mine), version=f"s{i}"))))
    parallel.close()
    in_turns(alone.close)
    if rank == 0:
        torch.save(times, out)
    dist.destroy_process_group()


def pipeline_senders(tensors, urls, bucket: int, repeats: int) -> None:
    half = len(tensors) // 2  # in state-dict order: embeddings + first layers, then the rest
    shares = [tensors[:half], tensors[half:]]
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    mb = [round(sum(t.numel() * t.element_size() for _, t in s) / 1e6, 1) for s in shares]
    nb = [len(list(iter_buckets(s, bucket))) for s in shares]
    print(f"model {total / 1e6:.1f} MB in {len(tensors)} tensors, 2 senders (stage shares {mb} MB in "
          f"{nb} buckets of <= {bucket / 1e6:.0f} MB), {len(urls)} server(s), backend gloo, "
          f"{repeats} repeats")
    out = os.path.join(tempfile.mkdtemp(prefix="wsync_pp_"), "times.pt")
    mp.start_processes(_stage_sender, args=(free_port(), shares, urls, bucket, repeats, out),
                       nprocs=2, join=True, start_method="spawn")
    times = torch.load(out)
    raw = "raw broadcast (gloo)"
    _print_table({raw: times["raw"], "sync PP=2 parallel": times["parallel"],
                  " its bucket sends only": times["transfers"],
                  "sync PP=2 sequential": times["sequential"]}, total, raw)
    par, seq = statistics.median(times["parallel"]), statistics.median(times["sequential"])
    ratio = par / statistics.median(times["raw"])
    print(f"parallel / sequential {par / seq:.2f} (medians); parallel / raw {ratio:.2f}: target <= 1.15 "
          f"{'met' if ratio <= 1.15 else 'not met'}")


if __name__ == "__main__":
    main()
