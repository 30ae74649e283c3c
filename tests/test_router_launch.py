"""The sglang-router process starts without SGLang's Python package (rollout/router_shim).

Its launcher imports SGLang only for the optional tracing of the mini_lb debug balancer; kept out,
the router starts in ~2 s instead of ~25 s on a busy 2-core machine (it starts once per training
run and at every restart). The router's own /health answers before any worker registers, so no
rollout server is needed to start it here; the tests behind a router (test_rollout_servers.py,
test_e2e_megatron_sync.py, the trainer runs) show it routes with the shim in place.
"""

from __future__ import annotations

import os

from maspo_megatron.rollout.router_shim import ROUTER_SHIM_DIR
from maspo_megatron.rollout.servers import RouterManager, free_port


def test_router_process_runs_the_rust_router_without_sglang_loaded(tmp_path):
    worker = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the router starts anyway
    router = RouterManager([worker], health_path="/health", log_dir=str(tmp_path), startup_timeout_s=120)
    try:
        router.start()
        proc = router.procs[0]
        assert proc.env["PYTHONPATH"].split(os.pathsep)[0] == ROUTER_SHIM_DIR
        with open(f"/proc/{proc.pid}/maps") as f:
            mapped = {line.split()[-1] for line in f if "/" in line}
        assert any("sglang_router_rs" in p for p in mapped), "the Rust router is not loaded"
        # SGLang imports torch first thing: neither its package nor libtorch may be in the process.
        loaded = [p for p in mapped if "libtorch" in p or f"{os.sep}sglang{os.sep}" in p]
        assert not loaded, loaded
    finally:
        router.stop()
