"""The real SGLang 0.5.23 server on CPU: its CPU engine plus our pure-torch ``sgl_kernel``
stand-in (``maspo_megatron/rollout/sglang/cpu_shim``), started by the trainer's own command
builder.

One server per module (start-up takes 16-60 s on 2 idle cores, minutes on busy ones), on a tiny
random-init HF Llama. References are HF transformers forwards in float32. The stand-in records
every op the server asks it for (``MASPO_SGL_KERNEL_SHIM_LOG``); the last real-server test checks
that the whole run used implemented ops only. The unit tests at the end need no server.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import json
import math
import os
import signal
import sys
import time
import urllib.request
from dataclasses import dataclass

import pytest
import torch

from maspo_megatron.rollout.backend import ServerSpec
from maspo_megatron.rollout.sglang import cpu_shim
from maspo_megatron.rollout.sglang.server import server_command
from maspo_megatron.rollout.servers import ManagedProcess, free_port, http_ok

SHIM_FILE = os.path.join(cpu_shim.SHIM_DIR, "sgl_kernel", "__init__.py")
STARTUP_TIMEOUT_S = 600
PROMPT = [5, 17, 9, 42, 3, 28]
ATOL = 1e-4

CPU_VALUE_FLAGS = {"--device": "cpu", "--attention-backend": "torch_native",
                   "--sampling-backend": "pytorch"}
CPU_SWITCHES = ["--disable-cuda-graph", "--disable-radix-cache", "--disable-overlap-schedule",
                "--skip-server-warmup"]


def _build_model(path: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, dtype="float32")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than the default init: peaked outputs, no near-ties in argmax
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    return model


def _hf_token_logprobs(model, ids, temperature: float = 1.0) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1, log_softmax(logits / temperature)."""
    x = torch.tensor([list(ids)])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0].float() / temperature
    return torch.log_softmax(logits[:-1], -1).gather(1, x[0, 1:, None])[:, 0].tolist()


def _hf_greedy(model, prompt, n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _post(url: str, body: dict, timeout_s: float = 300.0):
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read().decode())


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _stop_and_reap(proc: ManagedProcess) -> None:
    """SIGTERM the server's process group, SIGKILL it if anything is left: no orphans."""
    if proc.proc is None:
        return
    pgid = proc.proc.pid  # start_new_session: the launcher leads its own group
    proc.stop(grace_s=20.0)
    deadline = time.monotonic() + 20.0
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)


@dataclass
class Server:
    url: str
    model: object
    shim_log: str
    server_log: str


@contextlib.contextmanager
def cpu_server(model_dir: str, log_dir: str, *, dtype: str = "float32", max_total_tokens: int = 2048,
               extra_args: list[str] | None = None):
    """A real SGLang CPU server for ``model_dir``, the stand-in on its PYTHONPATH logging the ops
    it is asked for; yields ``(url, shim_log, server_log)``; the process group is reaped on exit."""
    shim_log, server_log = os.path.join(log_dir, "sgl_kernel_ops.jsonl"), os.path.join(log_dir, "server.log")
    port = free_port()
    spec = ServerSpec(model_path=model_dir, device="cpu", dtype=dtype, max_total_tokens=max_total_tokens,
                      extra_args=list(extra_args or []))
    cmd, env = server_command(spec, port, "127.0.0.1")
    assert env.get("PYTHONPATH", "").split(os.pathsep)[0] == cpu_shim.SHIM_DIR, \
        "this test is about the stand-in: it must be on the server's PYTHONPATH"
    url = f"http://127.0.0.1:{port}"
    proc = ManagedProcess(cmd, url, server_log, {**os.environ, **env, cpu_shim.LOG_ENV: shim_log})
    t0 = time.monotonic()
    proc.start()
    try:
        while not http_ok(url + "/health", timeout_s=5.0):
            if not proc.alive:
                pytest.fail(f"SGLang exited during start-up:\n{proc.log_tail(60)}")
            if time.monotonic() - t0 > STARTUP_TIMEOUT_S:
                pytest.fail(f"SGLang not healthy after {STARTUP_TIMEOUT_S}s:\n{proc.log_tail(60)}")
            time.sleep(0.5)
        print(f"SGLang CPU server healthy after {time.monotonic() - t0:.1f} s", file=sys.stderr)
        yield url, shim_log, server_log
    finally:
        _stop_and_reap(proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("sglang_real")
    model_dir = str(root / "model")
    model = _build_model(model_dir)
    with cpu_server(model_dir, str(root)) as (url, shim_log, server_log):
        yield Server(url, model, shim_log, server_log)


def _check_logprob_entries(entries, output_ids):
    assert len(entries) == len(output_ids)
    for (lp, tok, _text), out in zip(entries, output_ids):
        assert tok == out
        assert math.isfinite(lp) and lp <= 0.0


@pytest.mark.sglang
def test_generate_n_samples_with_logprobs(server):
    temperature = 0.7
    body = {"input_ids": PROMPT, "return_logprob": True,
            "sampling_params": {"n": 4, "max_new_tokens": 8, "temperature": temperature,
                                "ignore_eos": True}}
    outs = _post(server.url, body)
    assert isinstance(outs, list) and len(outs) == 4
    for out in outs:
        ids = out["output_ids"]
        assert len(ids) == 8 and all(0 <= t < 64 for t in ids)
        entries = out["meta_info"]["output_token_logprobs"]
        _check_logprob_entries(entries, ids)
        # The returned log-probs are log_softmax(logits / temperature) of the sampled tokens.
        ref = _hf_token_logprobs(server.model, PROMPT + ids, temperature)[len(PROMPT) - 1:]
        assert [e[0] for e in entries] == pytest.approx(ref, abs=ATOL)
    assert len({tuple(o["output_ids"]) for o in outs}) > 1, "4 samples at T=0.7 all identical"

    # Several requests at once go through continuous batching: same checks per request.
    prompts = [[2 + i, 40 - i, 7, 11 + 2 * i] for i in range(6)]

    def one(p):
        return p, _post(server.url, {"input_ids": p, "return_logprob": True, "sampling_params": {
            "n": 2, "max_new_tokens": 6, "temperature": 1.0, "ignore_eos": True}})

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        for p, outs in pool.map(one, prompts):
            assert len(outs) == 2
            for out in outs:
                entries = out["meta_info"]["output_token_logprobs"]
                _check_logprob_entries(entries, out["output_ids"])
                ref = _hf_token_logprobs(server.model, p + out["output_ids"])[len(p) - 1:]
                assert [e[0] for e in entries] == pytest.approx(ref, abs=ATOL)


@pytest.mark.sglang
def test_greedy_and_prompt_logprobs_equal_hf(server):
    n_new = 10
    out = _post(server.url, {"input_ids": PROMPT, "return_logprob": True, "logprob_start_len": 0,
                             "sampling_params": {"max_new_tokens": n_new, "temperature": 0.0,
                                                 "ignore_eos": True}})
    ids = out["output_ids"]
    assert ids == _hf_greedy(server.model, PROMPT, n_new)
    meta = out["meta_info"]
    _check_logprob_entries(meta["output_token_logprobs"], ids)
    ref = _hf_token_logprobs(server.model, PROMPT + ids)
    # Greedy: log-probs of the unscaled softmax.
    assert [e[0] for e in meta["output_token_logprobs"]] == pytest.approx(ref[len(PROMPT) - 1:], abs=ATOL)
    # logprob_start_len=0: the whole prompt, None for its first token.
    prompt_lp = meta["input_token_logprobs"]
    assert [e[1] for e in prompt_lp] == PROMPT
    assert prompt_lp[0][0] is None
    assert [e[0] for e in prompt_lp[1:]] == pytest.approx(ref[:len(PROMPT) - 1], abs=ATOL)


@pytest.mark.sglang
def test_run_reached_only_implemented_stand_in_ops(server):
    """Runs after the requests above (same module server): the stand-in's record of them."""
    with open(server.shim_log) as f:
        events = [json.loads(line) for line in f]
    imports = [e for e in events if e["event"] == "import"]
    assert imports, "the server never imported the sgl_kernel stand-in"
    stand_in = _load_shim()
    called = {e["op"] for e in events if e["event"] == "call"}
    assert called <= set(stand_in.IMPLEMENTED), f"placeholder ops called: {called - set(stand_in.IMPLEMENTED)}"
    missing = sorted({e["op"] for e in events if e["event"] == "lookup"})
    assert not missing, f"the server looked up ops the stand-in does not have: {missing}"
    with open(server.server_log, errors="replace") as f:
        log = f.read()
    assert "NotImplementedError" not in log
    assert "[sgl_kernel CPU stand-in]" not in log


# ----------------------------------------------------------------------------------------------
# The command builder and the stand-in itself (no server).


def _flag_value(cmd, flag):
    assert flag in cmd, f"{flag} missing from {cmd}"
    return cmd[cmd.index(flag) + 1]


def test_cpu_server_command_and_env():
    spec = ServerSpec(model_path="/m", device="cpu", dtype="float32", max_total_tokens=1024)
    cmd, env = server_command(spec, 30001, "127.0.0.9", python="py")
    assert cmd[:3] == ["py", "-m", "sglang.launch_server"]
    for flag, value in {**CPU_VALUE_FLAGS, "--model-path": "/m", "--dtype": "float32",
                        "--max-total-tokens": "1024", "--host": "127.0.0.9", "--port": "30001"}.items():
        assert _flag_value(cmd, flag) == value
    for switch in CPU_SWITCHES + ["--skip-tokenizer-init"]:
        assert switch in cmd
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"
    if not cpu_shim.real_sgl_kernel_importable(sys.executable):
        assert env["PYTHONPATH"].split(os.pathsep)[0] == cpu_shim.SHIM_DIR

    gpu_cmd, gpu_env = server_command(ServerSpec(model_path="/m"), 30001, "127.0.0.9", python="py")
    assert not set(CPU_VALUE_FLAGS) & set(gpu_cmd) and not set(CPU_SWITCHES) & set(gpu_cmd)
    assert "SGLANG_USE_CPU_ENGINE" not in gpu_env and "PYTHONPATH" not in gpu_env


def _load_shim(name: str = "sgl_kernel_stand_in_under_test"):
    """The stand-in as a fresh module (not registered as ``sgl_kernel``)."""
    spec = importlib.util.spec_from_file_location(name, SHIM_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stand_in_refuses_to_import_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA device"):
        _load_shim()


def test_cpu_engine_env_refuses_with_cuda(monkeypatch):
    monkeypatch.setattr(cpu_shim, "real_sgl_kernel_importable", lambda python=sys.executable: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA device"):
        cpu_shim.cpu_engine_env()


def test_cpu_engine_env_puts_the_stand_in_first(monkeypatch):
    monkeypatch.setattr(cpu_shim, "real_sgl_kernel_importable", lambda python=sys.executable: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env = cpu_shim.cpu_engine_env(base_pythonpath=os.pathsep.join(["/a", cpu_shim.SHIM_DIR, "/b"]))
    assert env == {"SGLANG_USE_CPU_ENGINE": "1",
                   "PYTHONPATH": os.pathsep.join([cpu_shim.SHIM_DIR, "/a", "/b"])}


def test_cpu_engine_env_uses_a_real_sgl_kernel(monkeypatch):
    monkeypatch.setattr(cpu_shim, "real_sgl_kernel_importable", lambda python=sys.executable: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no stand-in: nothing to refuse
    assert cpu_shim.cpu_engine_env() == {"SGLANG_USE_CPU_ENGINE": "1"}


def test_real_sgl_kernel_probe_does_not_count_the_stand_in(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", cpu_shim.SHIM_DIR)
    cpu_shim.real_sgl_kernel_importable.cache_clear()
    try:
        try:
            import sgl_kernel  # noqa: F401
            real = not getattr(sgl_kernel, "IS_MASPO_CPU_SHIM", False)
        except ImportError:
            real = False
        assert cpu_shim.real_sgl_kernel_importable(sys.executable) is real
    finally:
        cpu_shim.real_sgl_kernel_importable.cache_clear()


def test_stand_in_missing_op_raises_not_implemented_naming_it(monkeypatch, tmp_path):
    log = tmp_path / "ops.jsonl"
    monkeypatch.setenv(cpu_shim.LOG_ENV, str(log))
    mod = _load_shim()
    with pytest.raises(NotImplementedError, match="silu_and_mul_cpu"):
        mod.silu_and_mul_cpu
    # ... which is also an AttributeError: probes see a missing op, as without sgl-kernel.
    assert not hasattr(mod, "fused_experts_cpu")
    monkeypatch.setitem(sys.modules, "sgl_kernel", mod)
    with pytest.raises(ImportError):
        exec("from sgl_kernel import rmsnorm", {})
    with pytest.raises(AttributeError) as dunder:
        mod.__wrapped__
    assert not isinstance(dunder.value, NotImplementedError)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["event"] for e in events] == ["import", "lookup", "lookup", "lookup"]
    assert [e["op"] for e in events[1:]] == ["silu_and_mul_cpu", "fused_experts_cpu", "rmsnorm"]


def test_stand_in_placeholders_import_but_raise_when_called(monkeypatch, tmp_path):
    log = tmp_path / "ops.jsonl"
    monkeypatch.setenv(cpu_shim.LOG_ENV, str(log))
    mod = _load_shim()
    monkeypatch.setitem(sys.modules, "sgl_kernel", mod)
    assert mod.PLACEHOLDERS and not set(mod.PLACEHOLDERS) & set(mod.IMPLEMENTED)
    for name in mod.PLACEHOLDERS:
        scope: dict = {}
        exec(f"from sgl_kernel import {name} as op", scope)
        with pytest.raises(NotImplementedError, match=name):
            scope["op"](torch.zeros(1))
    calls = [json.loads(line)["op"] for line in log.read_text().splitlines()
             if json.loads(line)["event"] == "call"]
    assert calls == list(mod.PLACEHOLDERS)


def test_assign_req_to_token_pool_cpu_matches_the_cpp_semantics():
    mod = _load_shim()
    g = torch.Generator().manual_seed(0)
    pool_len, num_reqs = 32, 6
    for idx_dtype in (torch.int32, torch.int64):
        req_pool_indices = torch.tensor([4, 1, 5, 0], dtype=idx_dtype)
        start = torch.tensor([0, 3, 7, 31], dtype=idx_dtype)
        end = torch.tensor([6, 3, 15, 32], dtype=idx_dtype)  # one empty request
        total = int((end - start).sum())
        out_cache_loc = torch.randperm(4096, generator=g)[:total].to(torch.int64)
        req_to_token = torch.randint(0, 100, (num_reqs, pool_len), generator=g, dtype=torch.int32)
        ref = req_to_token.clone()
        offset = 0
        for i in range(len(req_pool_indices)):
            n = int(end[i] - start[i])
            ref[int(req_pool_indices[i]), int(start[i]):int(end[i])] = out_cache_loc[offset:offset + n].int()
            offset += n
        mod.assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start, end,
                                         out_cache_loc, pool_len)
        assert torch.equal(req_to_token, ref)

    ok = dict(req_pool_indices=torch.tensor([0]), start_offset=torch.tensor([0]),
              end_offset=torch.tensor([2]), out_cache_loc=torch.tensor([5, 6]))
    with pytest.raises(RuntimeError, match="int32"):
        mod.assign_req_to_token_pool_cpu(req_to_token=torch.zeros(2, 4, dtype=torch.int64),
                                         pool_len=4, **ok)
    with pytest.raises(RuntimeError, match="pool_len"):
        mod.assign_req_to_token_pool_cpu(req_to_token=torch.zeros(2, 4, dtype=torch.int32),
                                         pool_len=8, **ok)
    with pytest.raises(RuntimeError, match="int64"):
        mod.assign_req_to_token_pool_cpu(req_to_token=torch.zeros(2, 4, dtype=torch.int32), pool_len=4,
                                         **{**ok, "out_cache_loc": torch.tensor([5, 6], dtype=torch.int32)})
