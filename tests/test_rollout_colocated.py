"""Colocated weight sync: the CUDA-IPC payload of /update_weights_from_tensor, memory release /
resume on the CPU server, and (GPU only) a trainer handing weights to a server on its own GPU.

The CPU tests check everything that does not need a CUDA handle: the pickled metadata as an
SGLang-style receiver (independent allowlist + its own FlattenedTensorMetadata) loads it, the
receiver's checks, the clear errors, and release/resume semantics against a live CPU server.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import pickle
import pickletools
import sys
import threading
import types

import pytest
import torch
from aiohttp import web

from maspo_megatron.rollout.protocol import (
    SGLANG_BUCKET_MODULE, ProtocolError, bucket_from_payload, bucket_payload, dumps_ipc_payload,
    flatten_bucket, loads_ipc_payload, order_for_alignment, serialize_ipc_bucket,
)
from maspo_megatron.rollout.servers import free_port
from test_e2e_megatron_sync import COMPLETION, PROMPT, _make_model
from maspo_megatron.rollout.weight_sync import (
    WeightSyncConfig, WeightSyncer, WeightSyncError, iter_buckets, post_json,
)



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
    text = dumps_ipc_payload({"flattened_tensor": None,
                              "metadata": bucket_payload(flat, metas)["metadata"]})
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


def test_payload_round_trip_through_our_receiver_checks():
    named = order_for_alignment(_mixed())
    flat, metas = flatten_bucket(named)
    obj = loads_ipc_payload(dumps_ipc_payload({"flattened_tensor": None,
                                               "metadata": bucket_payload(flat, metas)["metadata"]}))
    obj["flattened_tensor"] = flat  # stands in for the tensor the CUDA handle would rebuild
    got_flat, got = bucket_from_payload(obj)
    assert got_flat is flat and got == metas


def test_receiver_rejects_bad_payloads_naming_the_problem():
    import os as os_module

    flat, metas = flatten_bucket(order_for_alignment(_mixed()))
    wire = bucket_payload(flat, metas)["metadata"]
    evil = base64.b64encode(pickle.dumps(os_module.system)).decode()
    with pytest.raises(ProtocolError, match="system, which a weight payload may not contain"):
        loads_ipc_payload(evil)
    with pytest.raises(ProtocolError, match="not base64"):
        loads_ipc_payload("@@not base64@@")
    with pytest.raises(ProtocolError, match="'flattened_tensor' and 'metadata'"):
        bucket_from_payload({"metadata": wire})
    with pytest.raises(ProtocolError, match="1-D uint8"):
        bucket_from_payload({"flattened_tensor": flat.float(), "metadata": wire})
    with pytest.raises(ProtocolError, match=r"metadata\[0\] \('b.fp32'\).*do not fit"):
        bucket_from_payload({"flattened_tensor": flat[:10], "metadata": wire})
    wire[1] = dataclasses.replace(wire[1], numel=wire[1].numel + 2, end_idx=wire[1].end_idx + 2)
    with pytest.raises(ProtocolError, match=r"metadata\[1\].*do not fit"):
        bucket_from_payload({"flattened_tensor": flat, "metadata": wire})


def test_serialize_refuses_cpu_buffer():
    flat, metas = flatten_bucket(_mixed()[:1])
    with pytest.raises(ValueError, match="must live on a CUDA device"):
        serialize_ipc_bucket(flat, metas)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_colocated_mode_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"colocated mode needs CUDA tensors \(CUDA-IPC\)"):
        WeightSyncer(["http://x"], WeightSyncConfig(mode="colocated"))


# --------------------------------------------------------------------------- live CPU server
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("colocated") / "model")
    _make_model(path)
    return path


@pytest.fixture
def server(model_dir, request):
    """A CPUServer on a free port, served from a background thread (sync HTTP works)."""
    from maspo_megatron.rollout.cpu_server import CPUServer

    backup = getattr(request, "param", False)
    srv = CPUServer(model_dir, weights_cpu_backup=backup)
    loop = asyncio.new_event_loop()
    port = free_port()
    runner = web.AppRunner(srv.app())
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    srv.pool.shutdown()


def _score(url):
    from maspo_megatron.rollout.client import RolloutClient

    return torch.tensor(asyncio.run(RolloutClient([url]).score(PROMPT, COMPLETION)))


def test_cpu_server_answers_400_to_update_weights_from_tensor(server):
    _, url = server
    body = {"serialized_named_tensors": ["x"], "load_format": "flattened_bucket"}
    with pytest.raises(WeightSyncError, match=r"HTTP 400.*CUDA-IPC.*--device cuda"):
        post_json(url, "/update_weights_from_tensor", body, 30)


def test_release_and_resume_emulate_sglang_memory_saver(server, tmp_path):
    srv, url = server
    before = _score(url)
    name = "model.layers.0.mlp.up_proj.weight"
    syncer = WeightSyncer([url], WeightSyncConfig(mode="disk", disk_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="tags must be drawn from"):
        syncer.release_memory(["gpu"])
    syncer.release_memory()  # None: every tag, as SGLang's GPU_MEMORY_ALL_TYPES
    assert srv.engine.released == {"weights", "kv_cache", "cuda_graph"}
    assert srv.engine.params[name].numel() == 0, "released weights must free their memory"
    with pytest.raises(WeightSyncError, match="HTTP 400.*already released"):
        syncer.release_memory(["weights"])
    from maspo_megatron.rollout.client import RolloutRequestError
    with pytest.raises(RolloutRequestError, match="resume_memory_occupation"):
        _score(url)
    with pytest.raises(WeightSyncError, match="HTTP 400.*weights are released"):
        post_json(url, "/get_weights_by_name", {"name": name, "truncate_size": 1}, 30)

    syncer.resume_memory(["weights"])
    with pytest.raises(WeightSyncError, match=r"HTTP 400.*\['weights'\] is not released"):
        syncer.resume_memory(["weights"])
    # Without a CPU backup the values are gone (NaN here; undefined in SGLang) until a sync.
    assert torch.isnan(srv.engine.params[name]).all()
    state = {n: t.detach().clone() for n, t in _reference_state(srv).items()}
    syncer.sync(state.items(), version=3)
    syncer.resume_memory(["kv_cache", "cuda_graph"])
    torch.testing.assert_close(_score(url), before, atol=1e-6, rtol=0)


def _reference_state(srv):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(srv.engine.model_path, dtype=torch.float32).state_dict()


@pytest.mark.parametrize("server", [True], indirect=True)
def test_release_with_cpu_backup_restores_the_weights(server):
    srv, url = server
    before = _score(url)
    post_json(url, "/release_memory_occupation", {"tags": ["weights"]}, 30)
    post_json(url, "/resume_memory_occupation", {"tags": ["weights"]}, 30)
    torch.testing.assert_close(_score(url), before, atol=0, rtol=0)


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_colocated_sync_through_cuda_ipc_into_a_server_on_the_same_gpu(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from maspo_megatron.rollout.servers import ServerManager, cpu_server_command

    servers = ServerManager(lambda port: cpu_server_command(model_dir, port, extra_args=["--device", "cuda"]),
                            1, startup_timeout_s=120, log_dir=str(tmp_path))
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
        cfg = WeightSyncConfig(mode="colocated", bucket_bytes=16 << 10, verify_tensors=8)
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
        assert _get(url, "/get_weight_version")["weight_version"] == "1"
    finally:
        servers.stop()


def _get(url, path):
    import json
    import urllib.request

    with urllib.request.urlopen(url + path, timeout=30) as resp:
        return json.loads(resp.read())
