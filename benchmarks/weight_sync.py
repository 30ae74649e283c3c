"""Weight-sync throughput into real SGLang servers: distributed (flattened_bucket broadcast),
distributed + the log-prob proof, and disk, each against a raw broadcast of the same bytes.

Prints seconds and GB/s of a full ``WeightSyncer.sync`` for a synthetic Llama of about
``--size-mb`` megabytes, next to ``torch.distributed.broadcast`` of the same bytes in the same
bucket sizes to the same number of receiver processes, measured in this process with the same
group mechanism. The ratio sync/raw is the protocol's overhead (HTTP, session, packing, loading
into the model, pause/continue; with the proof also its probe prefills on every server). Median
and spread over ``--repeats``.

CPU (default): starts ``--num-servers`` real SGLang servers on their CPU engine (gloo). GPU: pass
``--server-urls`` of running SGLang servers and ``--model-path`` of the checkpoint they serve; the
trainer side then uses NCCL from ``cuda:0`` (the raw baseline needs one extra local GPU per
receiver).

    python benchmarks/weight_sync.py --size-mb 256 --bucket-mb 64 --num-servers 1
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
    raw = statistics.median(times["raw"])
    print(f"{'path':<24}{'median s':>10}{'min s':>9}{'max s':>9}{'GB/s':>8}{'vs raw':>8}")
    for mode, secs in times.items():
        med = statistics.median(secs)
        label = "raw broadcast (" + backend + ")" if mode == "raw" else "sync " + mode
        print(f"{label:<24}{med:>10.3f}{min(secs):>9.3f}{max(secs):>9.3f}{total / med / 1e9:>8.3f}"
              f"{med / raw:>8.2f}")


if __name__ == "__main__":
    main()
