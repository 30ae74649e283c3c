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
