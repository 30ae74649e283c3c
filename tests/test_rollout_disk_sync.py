"""Disk-mode weight sync keeps one full model copy on disk, not one per step.

Two stub servers answer the weight-sync endpoints and record which directory each was told to
load; one of them can be made to fail its load. Verification is off (the stubs hold no weights).
"""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
import torch
from aiohttp import web

from maspo_megatron.rollout.servers import free_port
from maspo_megatron.rollout.weight_sync import WeightSyncConfig, WeightSyncer, WeightSyncError


class _StubServer:
    def __init__(self):
        self.loaded: list[str] = []
        self.fail_load = False
        self.missing: list[str] = []  # paths that were not on disk when the server loaded them

    async def _load(self, request):
        path = (await request.json())["model_path"]
        if not os.path.isdir(path) or not any(f.endswith(".safetensors") for f in os.listdir(path)):
            self.missing.append(path)
        if self.fail_load:
            return web.json_response({"success": False, "message": "injected load failure"})
        self.loaded.append(path)
        return web.json_response({"success": True, "message": "ok"})

    @staticmethod
    async def _ok(request):
        return web.json_response({"success": True})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/update_weights_from_disk", self._load)
        for path in ("/pause_generation", "/continue_generation", "/update_weight_version",
                     "/flush_cache"):
            app.router.add_post(path, self._ok)
        return app


@pytest.fixture
def stubs():
    loop = asyncio.new_event_loop()
    servers, runners, urls = [_StubServer(), _StubServer()], [], []
    for srv in servers:
        runner = web.AppRunner(srv.app())
        loop.run_until_complete(runner.setup())
        port = free_port()
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{port}")
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield servers, urls
    for runner in runners:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _weights(step: int):
    return [("w", torch.full((4, 4), float(step))), ("b", torch.full((4,), float(step)))]


def _versions(disk_dir) -> list[str]:
    return sorted(d for d in os.listdir(disk_dir) if d.startswith("weights_v"))


def test_disk_sync_keeps_only_the_newest_complete_version(stubs, tmp_path):
    servers, urls = stubs
    (tmp_path / "notes.txt").write_text("not ours")
    syncer = WeightSyncer(urls, WeightSyncConfig(mode="disk", disk_dir=str(tmp_path),
                                                 http_timeout_s=10, timeout_s=10))
    syncer.sync(_weights(1), version=1)
    assert _versions(tmp_path) == ["weights_v1"]
    syncer.sync(_weights(2), version=2)
    assert _versions(tmp_path) == ["weights_v2"], "every server loaded v2: v1 is no longer needed"

    # One server fails to load v3: it may still restart from nothing newer than v2, and the
    # other server has loaded v3 — keep both.
    servers[1].fail_load = True
    with pytest.raises(WeightSyncError, match="injected load failure"):
        syncer.sync(_weights(3), version=3)
    assert _versions(tmp_path) == ["weights_v2", "weights_v3"]

    servers[1].fail_load = False
    syncer.sync(_weights(4), version=4)
    assert _versions(tmp_path) == ["weights_v4"]
    # Re-sending the current version (a restarted server) keeps it.
    syncer.sync(_weights(4), version=4)
    assert _versions(tmp_path) == ["weights_v4"]
    assert (tmp_path / "notes.txt").read_text() == "not ours"
    for srv in servers:
        assert srv.missing == [], "a server was told to load a directory that was not there"
    assert servers[0].loaded == [str(tmp_path / f"weights_v{v}") for v in (1, 2, 3, 4, 4)]
