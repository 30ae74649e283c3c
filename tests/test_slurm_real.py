"""The launcher on a real Slurm 22.05 cluster: the loopback one of ``scripts/slurm/up.sh`` (munged,
slurmctld, three slurmd n0..n2 on this machine, two fake GPUs each), which ``make test`` starts.

Each test submits the tiny recipe with ``python -m launch.slurm`` (no account, no images:
bare-metal) as a heterogeneous job — het group 0 the real SGLang server (CPU engine) and the
sglang-router, het group 1 torchrun — and checks what Slurm says (``scontrol show job``: there is
no accounting here, so neither ``sacct`` nor nemo-run's status, which calls it, can answer), the
job's own output files, and the run's ``metrics.jsonl``.

Where no cluster can be started (not root, no apt) the tests skip and say why; under CI (``CI``
set) that is a failure instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Each job takes 1-2 min on an idle 2-core machine (the requeue test two attempts and Slurm's 31 s
# requeue wait); the limits leave room for a busy one.
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.sglang, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parent.parent
SLURM_DIR = Path(os.environ.get("MASPO_SLURM_DIR", "/tmp/maspo-slurm"))
SLURM_CONF = os.environ.get("SLURM_CONF") or str(SLURM_DIR / "etc" / "slurm.conf")
JOB_TIMEOUT_S = 900  # ~1-2 min per job on an idle 2-core machine; far more while it is busy
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}
TINY = ["steps=2", "prompts_per_step=4", "eval_every=0", "save_every=0", "tensorboard=false"]


def _env() -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": SLURM_CONF}


def _cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=_env(), capture_output=True, text=True)
    return out.returncode == 0 and sum(line.split()[-1] == "idle" for line in out.stdout.splitlines()) >= 3


@pytest.fixture(scope="session")
def cluster():
    """The loopback cluster: reused when ``make test`` (or anyone) started it, else started here
    and stopped at the end (down.sh stops it only when no other holder still uses it)."""
    holder = str(os.getpid())
    started = False
    if not _cluster_up():
        up = subprocess.run(["bash", str(REPO / "scripts/slurm/up.sh"), "--holder", holder],
                            capture_output=True, text=True, env=_env())
        if up.returncode != 0 or not _cluster_up():
            reason_file = SLURM_DIR / "unavailable"
            reason = (reason_file.read_text().strip() if reason_file.exists() else "") or \
                up.stderr.strip()[-500:] or "sinfo does not show 3 idle nodes"
            message = f"no Slurm cluster could be started (scripts/slurm/up.sh): {reason}"
            if os.environ.get("CI"):
                pytest.fail(f"{message} — under CI the Slurm tests must run", pytrace=False)
            pytest.skip(message)
        started = True
    yield SLURM_CONF
    if started:
        subprocess.run(["bash", str(REPO / "scripts/slurm/down.sh"), "--holder", holder], env=_env())


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The demo's tiny Llama, tokenizer and synthetic data (made locally, no download)."""
    from maspo_megatron.demo import prepare_assets

    return prepare_assets(str(tmp_path_factory.mktemp("assets")))


def _snapshot_repo(dest: Path) -> Path:
    """This working tree (tracked and untracked-but-not-ignored files) as a one-commit repo, so that
    the launcher's default packaging (``git archive`` of HEAD) ships exactly the code under test."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "snapshot"], cwd=dest, check=True)
    return dest


def submit(tmp: Path, assets: dict, *, train_nodes: int, gpus_per_node: int, overrides: list[str],
           extra: list[str] = (), code_dir: str | None = str(REPO), cwd: Path = REPO) -> tuple[str, Path, Path]:
    """``python -m launch.slurm`` with the tiny recipe; returns (job id, job dir, output dir)."""
    out_dir = tmp / "run"
    cmd = [sys.executable, "-m", "launch.slurm", "--recipe", "tiny_cpu",
           "--train-nodes", str(train_nodes), "--rollout-nodes", "1",
           "--gpus-per-node", str(gpus_per_node), "--rollout-gpus-per-node", "1",
           "--job-dir", str(tmp / "jobs"), "--time", "00:30:00", "--monitor-wait", "5", *extra,
           *(["--code-dir", code_dir] if code_dir else []),
           f"model.path={assets['model']}", f"data.train_path={assets['train']}",
           f"output_dir={out_dir}", *overrides]
    res = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"launch.slurm failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    m = re.search(r"submitted Slurm job (\d+) .*; job directory (\S+);", res.stdout)
    assert m, f"no job id in the launcher's output:\n{res.stdout[-2000:]}"
    return m.group(1), Path(m.group(2)), out_dir


def job_info(job_id: str) -> list[dict[str, str]]:
    """``scontrol show job -o``: one dict per het-job component."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.stdout.splitlines() if line.strip()]


def _job_logs(job_dir: Path) -> str:
    parts = []
    for f in sorted(job_dir.glob("*.out")):
        parts.append(f"==> {f.name}\n{f.read_text(errors='replace')[-4000:]}")
    return "\n".join(parts)


def wait_job(job_id: str, job_dir: Path, done=None, timeout_s: float = JOB_TIMEOUT_S) -> list[dict]:
    """Polls until every component is in a final state (and ``done(components)`` holds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        comps = job_info(job_id)
        if all(c.get("JobState") in TERMINAL for c in comps) and (done is None or done(comps)):
            return comps
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], env=_env())
            pytest.fail(f"job {job_id} not finished after {timeout_s:.0f}s: "
                        f"{[(c.get('JobId'), c.get('JobState')) for c in comps]}\n{_job_logs(job_dir)}")
        time.sleep(2)


def read_steps(out_dir: Path) -> list[int]:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def assert_completed(comps: list[dict], job_dir: Path, restarts: int = 0) -> None:
    logs = _job_logs(job_dir)
    assert len(comps) == 2, comps  # two het-job components: rollout + training
    for c in comps:
        assert (c["JobState"], c["ExitCode"]) == ("COMPLETED", "0:0"), f"{c}\n{logs}"
        assert c["Restarts"] == str(restarts), f"{c}\n{logs}"
    batch = next(job_dir.glob("sbatch_*.out")).read_text()
    assert batch.rstrip().count("job exited with code 0") >= 1, logs


# --------------------------------------------------------------------------- tests


def test_tiny_recipe_het_job_1_plus_1_as_the_readme_runs_it(cluster, assets, tmp_path):
    """The README's command minus images and account, default packaging (git archive of HEAD —
    of a snapshot of this tree), 1 rollout node + 1 training node running TP=2 on 2 "GPUs"."""
    snap = _snapshot_repo(tmp_path / "repo")
    job_id, job_dir, out_dir = submit(tmp_path, assets, train_nodes=1, gpus_per_node=2, overrides=TINY,
                                      code_dir=None, cwd=snap)
    comps = wait_job(job_id, job_dir)
    assert_completed(comps, job_dir)
    assert (job_dir / "code" / "launch" / "node.py").is_file()  # shipped, not linked
    assert [c["NodeList"] for c in comps] == ["n0", "n1"]
    assert read_steps(out_dir) == [1, 2], _job_logs(job_dir)
    rollout_log = next(job_dir.glob("log-*-0_*.out")).read_text()
    assert "1 sglang server(s) (cpu) healthy on n0 at 127.0.0.1" in rollout_log
    servers = json.loads((out_dir / "rollout_logs" / "n0" / "servers.json").read_text())
    assert {s["role"] for s in servers} == {"server", "router"}
    assert all(s["url"].startswith("http://127.0.0.1:") for s in servers)  # the node's address, no wildcard
    assert (out_dir / "rollout_logs" / "n0" / "server0_30000.log").stat().st_size > 0


def test_tiny_recipe_het_job_1_plus_2(cluster, assets, tmp_path):
    """Training spread over two nodes (TP=2 across n1 and n2, one rank each), servers on n0."""
    job_id, job_dir, out_dir = submit(tmp_path, assets, train_nodes=2, gpus_per_node=1, overrides=TINY)
    comps = wait_job(job_id, job_dir)
    assert_completed(comps, job_dir)
    assert [c["NodeList"] for c in comps] == ["n0", "n[1-2]"]
    assert read_steps(out_dir) == [1, 2], _job_logs(job_dir)
    train_log = next(job_dir.glob("log-*-1_*.out")).read_text()
    assert "--nnodes=2" in train_log and "--nproc-per-node=1" in train_log


def test_killed_rollout_server_requeues_and_resumes_without_repeating_a_step(cluster, assets, tmp_path):
    """README: a dead rollout server fails the job on purpose; ``--retries`` requeues it and the
    trainer resumes from its last checkpoint. The server is SIGKILLed right after the checkpoint
    of step 1 is complete; every step must then appear exactly once in metrics.jsonl."""
    steps = 4
    overrides = [f"steps={steps}", "prompts_per_step=4", "eval_every=0", "save_every=1", "tensorboard=false"]
    job_id, job_dir, out_dir = submit(tmp_path, assets, train_nodes=1, gpus_per_node=2, overrides=overrides,
                                      extra=["--retries", "1"])
    latest = out_dir / "checkpoints" / "latest"
    servers_file = out_dir / "rollout_logs" / "n0" / "servers.json"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (latest.exists() and latest.read_text().strip() == "1"):
        comps = job_info(job_id)
        if time.monotonic() > deadline or all(c.get("JobState") in TERMINAL for c in comps):
            subprocess.run(["scancel", job_id], env=_env())
            pytest.fail(f"no checkpoint of step 1: {[(c['JobId'], c['JobState']) for c in comps]}\n"
                        f"{_job_logs(job_dir)}")
        time.sleep(0.1)
    server = next(s for s in json.loads(servers_file.read_text()) if s["role"] == "server")
    os.killpg(server["pid"], signal.SIGKILL)  # attempt 0's SGLang server: its whole process group
    killed_at = time.monotonic()

    comps = wait_job(job_id, job_dir, done=lambda cs: all(c.get("Restarts") == "1" for c in cs))
    assert_completed(comps, job_dir, restarts=1)
    logs = _job_logs(job_dir)
    first_rollout = next(job_dir.glob("log-*-0_*_0.out")).read_text()
    assert "exited: ['http://127.0.0.1:30000']" in first_rollout, logs
    second_train = next(job_dir.glob("log-*-1_*_1.out")).read_text()
    m = re.search(r"resumed from \S+ at step (\d+)", second_train)
    assert m, logs
    resumed = int(m.group(1))
    assert 1 <= resumed < steps
    assert read_steps(out_dir) == list(range(1, steps + 1)), logs  # no step repeated or skipped
    print(f"server killed; job requeued and completed {time.monotonic() - killed_at:.0f}s later, "
          f"resumed at step {resumed}")
