"""Managed server processes never outlive a trainer that is killed with SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_dies_when_its_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import time
        from maspo_megatron.rollout.servers import ManagedProcess
        p = ManagedProcess(["sleep", "120"], "http://127.0.0.1:1", None)
        p.start()
        print(p.proc.pid, flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # alive, in its own session
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        # A zombie still answers kill(0); reap it if it is ours (it is not: init reaps it).
        with open(f"/proc/{child}/stat") as f:
            if f.read().split()[2] == "Z":
                return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the server outlived its killed parent")


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_started_from_a_short_lived_thread_outlives_the_thread():
    import threading

    from maspo_megatron.rollout.servers import ManagedProcess

    p = ManagedProcess(["sleep", "30"], "http://127.0.0.1:1", None)
    t = threading.Thread(target=p.start)  # e.g. the watcher restarting a server, then stopped
    t.start()
    t.join()
    time.sleep(1.0)
    try:
        assert p.alive, "the server died with the thread that started it"
    finally:
        p.kill()


def test_a_server_whose_port_was_taken_moves_to_another_at_start_up(tmp_path):
    """On a busy machine another process may bind the port ``free_port`` chose before the server
    does: the manager moves such a server (only at start-up, before anyone knows its URL, and only
    to ports it chose itself)."""
    from maspo_megatron.rollout.servers import ServerManager

    script = textwrap.dedent("""
        import http.server, os, sys
        flag = sys.argv[2]
        if not os.path.exists(flag):  # the first start finds its port taken
            open(flag, "w").close()
            print("ERROR: [Errno 98] error while attempting to bind: address already in use", flush=True)
            sys.exit(1)
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers()
            def log_message(self, *a):
                pass
        http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
    """)

    def factory(flag):
        return lambda port, host: [sys.executable, "-c", script, str(port), str(flag)]

    manager = ServerManager(factory(tmp_path / "a"), 1, log_dir=str(tmp_path), startup_timeout_s=60)
    first = manager.urls[0]
    try:
        urls = manager.start()
        assert urls != [first] and manager.healthy(urls[0])
        assert manager.procs[0].log_path.endswith(f"server0_{urls[0].rsplit(':', 1)[1]}.log")
    finally:
        manager.stop()
    fixed = ServerManager(factory(tmp_path / "b"), 1, ports=[int(first.rsplit(":", 1)[1])],
                          log_dir=str(tmp_path), startup_timeout_s=60)
    try:
        with pytest.raises(RuntimeError, match="exited with code 1 during start-up"):
            fixed.start()  # a given port stays: others know it
    finally:
        fixed.stop()


def test_interrupt_watchdog_ends_a_process_whose_main_thread_is_stuck():
    """SIGTERM while the main thread is blocked in C that retries on EINTR (libc system(), as a
    gloo collective waiting for a peer that is gone): the Python handler cannot run; the
    watchdog ends the process after its grace."""
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import ctypes
        from maspo_megatron.runtime.lifetime import InterruptGuard
        InterruptGuard(grace_s=1.0, on_force=lambda s: print("forced", s, flush=True)).install()
        print("ready", flush=True)
        ctypes.CDLL(None).system(b"sleep 30")
        print("not stuck", flush=True)
    """)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        t0 = time.monotonic()
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=20) == 128 + signal.SIGTERM
        assert time.monotonic() - t0 < 10
        assert child.stdout.read().strip() == f"forced {int(signal.SIGTERM)}"
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # the `sleep 30`
        except ProcessLookupError:
            pass


def test_sigterm_becomes_interrupted_and_clean_up_runs():
    out = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os, signal, time
        from maspo_megatron.runtime.lifetime import Interrupted, InterruptGuard
        guard = InterruptGuard(grace_s=30.0).install()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        except Interrupted as e:
            print("interrupted", e.signal_name, e.code, flush=True)
            os.kill(os.getpid(), signal.SIGINT)  # a second signal during clean-up is ignored
            time.sleep(0.2)
            print("cleaned up", flush=True)
            raise
        finally:
            guard.close()
    """)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 128 + signal.SIGTERM, out.stderr
    assert out.stdout.split("\n")[:2] == ["interrupted SIGTERM 143", "cleaned up"]
