"""Colocated weight sync: the CUDA-IPC payload of /update_weights_from_tensor and (GPU only) a
trainer handing weights to a server on its own GPU.

The CPU tests check what does not need a CUDA handle: the pickled metadata as an SGLang-style
receiver (independent allowlist + its own FlattenedTensorMetadata) loads it, and the clear
errors. The GPU test needs a CUDA server; the lent GPU image has no SGLang, so it runs the test
double ``tests/doubles/sglang_emulator.py --device cuda`` (on an SGLang image, use the real one:
the real server on CPU crashes on /release_memory_occupation, so colocation is GPU-only).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import pickle
import pickletools
import sys
import types

import pytest
import torch

from maspo_megatron.rollout.sglang.ipc import (
    SGLANG_BUCKET_MODULE, bucket_payload, dumps_ipc_payload, serialize_ipc_bucket,
)
from maspo_megatron.rollout.weight_sync import (
    WeightSyncConfig, WeightSyncer, flatten_bucket, iter_buckets, order_for_alignment,
)
from sglang_servers import make_family_model
from test_e2e_megatron_sync import COMPLETION, PROMPT


def _mixed():
    g = torch.Generator().manual_seed(0)
    return [("a.bf16", torch.randn(3, 5, generator=g).to(torch.bfloat16)),
            ("b.fp32", torch.randn(7, generator=g)),
            ("c.int8", torch.randint(-5, 5, (3,), generator=g, dtype=torch.int8)),
            ("d.fp16", torch.randn(2, 3, generator=g).half())]


# --------------------------------------------------------------------------- payload
@dataclasses.dataclass
class _SGLangMeta:  # SGLang's srt/weight_sync/tensor_bucket.py FlattenedTensorMetadata, restated
    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


_SGLangMeta.__module__ = SGLANG_BUCKET_MODULE


class _SGLangStyleUnpickler(pickle.Unpickler):
    """SGLang's SafeUnpickler allowlist (srt/utils/common.py), restated independently."""

    PREFIXES = ("builtins.", "collections.", "copyreg.", "functools.", "torch.",
                "multiprocessing.reduction.", "sglang.srt.weight_sync.tensor_bucket.",
                "sglang.srt.model_executor.model_runner.", "sglang.srt.utils.")

    def find_class(self, module, name):
        if not any((module + ".").startswith(p) for p in self.PREFIXES):
            raise RuntimeError(f"blocked {module}.{name}")
        return super().find_class(module, name)


def _globals(data: bytes) -> set[tuple[str, str]]:
    """(module, name) pairs a pickle refers to (protocol 2+: STACK_GLOBAL after two strings)."""
    out, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            out.add((strings[-2], strings[-1]))
        elif op.name == "GLOBAL":
            out.add(tuple(arg.split(" ", 1)))
    return out


def test_bucket_metadata_pickles_as_sglang_class_and_rebuilds_like_sglang(monkeypatch):
    named = order_for_alignment(_mixed())
    flat, metas = flatten_bucket(named)
    # The CUDA handle needs a GPU; the metadata is what SGLang's allowlist and loader inspect.
    lent = SGLANG_BUCKET_MODULE not in sys.modules  # else SGLang's own class is used
    text = dumps_ipc_payload({"flattened_tensor": None,
                              "metadata": bucket_payload(flat, metas)["metadata"]})
    if lent:
        assert SGLANG_BUCKET_MODULE not in sys.modules, "the lent module name must not leak"
    data = base64.b64decode(text, validate=True)
    refs = _globals(data)
    assert (SGLANG_BUCKET_MODULE, "FlattenedTensorMetadata") in refs
    assert not [r for r in refs if r[0].startswith("maspo_megatron")], refs

    # As an SGLang server: its own class under that name, its allowlist, its reconstruction.
    parts = SGLANG_BUCKET_MODULE.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    sys.modules[SGLANG_BUCKET_MODULE].FlattenedTensorMetadata = _SGLangMeta
    got = _SGLangStyleUnpickler(io.BytesIO(data)).load()["metadata"]
    offset = 0
    for (name, t), m in zip(named, got):
        nbytes = t.numel() * t.element_size()
        assert isinstance(m, _SGLangMeta) and isinstance(m.shape, torch.Size)
        assert (m.name, tuple(m.shape), m.dtype) == (name, tuple(t.shape), t.dtype)
        assert (m.start_idx, m.end_idx, m.numel) == (offset, offset + nbytes, nbytes)
        rebuilt = flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)
        assert torch.equal(rebuilt, t)
        offset += nbytes


def test_serialize_refuses_cpu_buffer():
    flat, metas = flatten_bucket(_mixed()[:1])
    with pytest.raises(ValueError, match="must live on a CUDA device"):
        serialize_ipc_bucket(flat, metas)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_colocated_mode_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"colocated needs CUDA tensors \(CUDA-IPC\)"):
        WeightSyncer(["http://x"], WeightSyncConfig(mode="colocated"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("colocated") / "model")
    make_family_model(path, "qwen2", vocab=40)
    return path


def _score(url):
    from maspo_megatron.rollout.client import RolloutClient

    (lp,) = asyncio.run(RolloutClient([url]).score([PROMPT + COMPLETION], url))
    return torch.tensor(lp[len(PROMPT) - 1:])


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_colocated_sync_through_cuda_ipc_into_a_server_on_the_same_gpu(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from sglang_emulator import emulator_manager

    servers = emulator_manager(model_dir, 1, str(tmp_path))
    servers.start()
    try:
        url = servers.urls[0]
        trainer = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
        g = torch.Generator(device="cuda").manual_seed(1)
        bf16 = set()
        with torch.no_grad():
            for name, p in trainer.named_parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g, device="cuda"))
                if ".mlp." in name:  # sent as bf16: exact once the trainer holds bf16 values
                    p.copy_(p.to(torch.bfloat16).float())
                    bf16.add(name)
            ids = torch.tensor([PROMPT + COMPLETION], device="cuda")
            logits = trainer(input_ids=ids).logits[0].float()
            trained = torch.log_softmax(logits[len(PROMPT) - 1:-1], -1).gather(
                1, torch.tensor(COMPLETION, device="cuda")[:, None])[:, 0].cpu()
        named = [(n, p.detach().to(torch.bfloat16) if n in bf16 else p.detach())
                 for n, p in trainer.named_parameters()]
        cfg = WeightSyncConfig(mode="colocated", bucket_bytes=16 << 10, readback_tensors=8)
        buckets = list(iter_buckets(named, cfg.bucket_bytes))
        assert len(buckets) > 3 and any(len({t.dtype for _, t in b}) > 1 for b in buckets)

        before = _score(url)
        assert (before - trained).abs().max() > 1e-2, "server already had the trainer's weights?"
        syncer = WeightSyncer([url], cfg)
        info = _get(url, "/server_info")
        syncer.release_memory()
        released = _get(url, "/server_info")
        weight_bytes = sum(p.numel() * 4 for p in trainer.parameters())
        assert info["device_memory_allocated"] - released["device_memory_allocated"] >= weight_bytes
        syncer.resume_memory(["weights"])
        stats = syncer.sync(named, version=1)
        syncer.resume_memory(["kv_cache", "cuda_graph"])
        assert stats.buckets == len(buckets)
        torch.testing.assert_close(_score(url), trained, atol=1e-4, rtol=0)
        assert _get(url, "/model_info")["weight_version"] == "1"
    finally:
        servers.stop()


def _get(url, path):
    import json
    import urllib.request

    with urllib.request.urlopen(url + path, timeout=30) as resp:
        return json.loads(resp.read())
