"""Launch (``launch/``): plan checks, the per-node entry point, the Slurm het-job script (nemo-run
dry run, offline) and the local executor's commands. No Slurm here: the sbatch script is rendered
and parsed, and its host-resolution block runs in bash against a fake ``scontrol``. The same
launcher on a real (loopback) Slurm cluster: tests/test_slurm_real.py."""

import json
import os
import re
import sys
import shlex
import subprocess
import textwrap

import pytest

from maspo_megatron.cli import load_recipe
from maspo_megatron.config import ConfigError, apply_overrides
from launch import local, node, slurm
from launch.plan import LaunchError, Ports, make_plan, rollout_args, train_args

PATHS = ["model.path=/models/r1-7b", "data.train_path=/data/train.parquet"]
TRICKY = "data.prompt_template={prompt} -- say it; use $x & \\boxed{}"  # quoting must survive


def _plan(recipe="maspo_r1_distill_7b", overrides=(*PATHS,), train_nodes=2, rollout_nodes=1, gpus=8):
    return make_plan(recipe, list(overrides), train_nodes=train_nodes, train_gpus_per_node=gpus,
                     rollout_nodes=rollout_nodes, rollout_gpus_per_node=gpus)


# --------------------------------------------------------------------------- plan


@pytest.mark.parametrize("kw, flag", [(dict(train_nodes=0), "--train-nodes"),
                                      (dict(rollout_nodes=0), "--rollout-nodes"),
                                      (dict(gpus=-1), "GPUs per node")])
def test_plan_rejects_non_positive_counts(kw, flag):
    with pytest.raises(LaunchError, match=re.escape(flag)):
        _plan(**kw)


def test_plan_rejects_unknown_recipe():
    with pytest.raises(ConfigError, match="unknown recipe 'nope'.*available: .*maspo_r1_distill_7b"):
        _plan(recipe="nope")


def test_plan_requires_model_and_data_paths():
    with pytest.raises(LaunchError, match="model.path is empty"):
        _plan(overrides=[])
    with pytest.raises(LaunchError, match="data.train_path is empty"):
        _plan(overrides=PATHS[:1])


def test_plan_checks_layout_against_nodes():
    with pytest.raises(LaunchError, match=r"1 training node\(s\) x 8 GPUs = 8 ranks.*tp\*pp\*cp"):
        _plan("maspo_llama3_70b_fp8", train_nodes=1)
    # Two rollout nodes, as the recipe says: on one, 64 requests of 22.5k tokens over 2 servers need
    # 55 GiB of KV cache per GPU besides 33 GiB of weights (the memory plan refuses it).
    assert _plan("maspo_llama3_70b_fp8", train_nodes=4, rollout_nodes=2).servers_per_node == 2


def test_plan_rejects_launcher_keys_and_bad_sglang_tp():
    with pytest.raises(LaunchError, match="rollout.server_urls is set by the launcher"):
        _plan(overrides=[*PATHS, "rollout.server_urls=[http://x:1]"])
    with pytest.raises(LaunchError, match="rollout.sglang_tp=3 must divide the 8"):
        _plan(overrides=[*PATHS, "rollout.sglang_tp=3"])
    with pytest.raises(LaunchError, match="ports collide"):
        make_plan("maspo_r1_distill_7b", PATHS, train_nodes=2, train_gpus_per_node=8, rollout_nodes=1,
                  rollout_gpus_per_node=8, ports=Ports(server=30000, router=30002))


def test_plan_moe_recipes_fit_their_nodes():
    # The memory plan of each MoE recipe at its documented node counts (tests/test_plan.py
    # checks the terms); one training node is too few for the 30B's EP8 at TP2.
    assert _plan("maspo_qwen3_30b_a3b", train_nodes=2, rollout_nodes=1).servers_per_node == 4
    assert _plan("maspo_qwen3_235b_a22b", train_nodes=16, rollout_nodes=8).servers_per_node == 1
    with pytest.raises(LaunchError, match="parallel.ep=8 must divide dp\\*cp = 4"):
        _plan("maspo_qwen3_30b_a3b", train_nodes=1)
    with pytest.raises(LaunchError, match="does not fit: rollout: one GPU of an SGLang TP8 server"):
        _plan("maspo_qwen3_235b_a22b", train_nodes=16, rollout_nodes=4)


# --------------------------------------------------------------------------- node


def test_node_rank_from_slurm_node_name(monkeypatch):
    monkeypatch.setenv("SLURMD_NODENAME", "gpu-b")
    assert node.node_rank(["gpu-a", "gpu-b"]) == 1
    monkeypatch.setenv("SLURMD_NODENAME", "gpu-z")
    with pytest.raises(node.NodeError, match=r"gpu-z\) is not among the hosts \['gpu-a', 'gpu-b'\]"):
        node.node_rank(["gpu-a", "gpu-b"])
    with pytest.raises(node.NodeError, match="--node-rank 2 is outside"):
        node.node_rank(["gpu-a", "gpu-b"], explicit=2)


def test_hosts_missing_names_the_env_var():
    with pytest.raises(node.NodeError, match="MASPO_TRAIN_HOSTS is unset or empty"):
        node.parse_hosts("", "train", node.ENV_TRAIN_HOSTS)
    assert node.parse_hosts(" a, b,", "train", node.ENV_TRAIN_HOSTS) == ["a", "b"]


def test_addresses_default_to_names_and_must_match_them():
    assert node.parse_addrs("", ["a", "b"], "train") == ["a", "b"]
    assert node.parse_addrs("10.0.0.1,10.0.0.2", ["a", "b"], "train") == ["10.0.0.1", "10.0.0.2"]
    with pytest.raises(node.NodeError, match=r"1 train addresses \['10.0.0.1'\] for 2 train hosts"):
        node.parse_addrs("10.0.0.1", ["a", "b"], "train")


def test_servers_bind_the_nodes_address_not_a_wildcard(capsys):
    assert node.bind_address("127.0.0.1") == "127.0.0.1"
    assert node.bind_address("localhost") == "127.0.0.1"
    assert capsys.readouterr().err == ""
    with pytest.raises(node.NodeError, match="cannot resolve this node's address 'no-such-host.invalid'"):
        node.bind_address("no-such-host.invalid")
    args = node.build_parser().parse_args(rollout_args(_plan()))
    assert args.bind_host is None  # i.e. bind_address(this node's address), never 0.0.0.0


def test_train_node_command_attaches_the_trainer_to_the_jobs_servers():
    plan = _plan(overrides=[*PATHS, TRICKY])
    args = node.build_parser().parse_args(
        train_args(plan, ["--rollout-hosts", "r0,r1", "--train-hosts", "t0,t1", "--node-rank", "1"]))
    assert args.overrides == [*PATHS, TRICKY]
    cmd = node.train_command(
        rollout_addrs=["10.0.0.1", "10.0.0.2"], train_addrs=["10.0.1.1", "10.0.1.2"], rank=1,
        nproc_per_node=args.nproc_per_node, servers_per_node=args.servers_per_node,
        server_port=args.server_port, router_port=args.router_port, master_port=args.master_port,
        recipe=args.recipe, overrides=args.overrides, python="python")
    assert cmd[:8] == ["python", "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8",
                       "--node-rank=1", "--master-addr=10.0.1.1", "--master-port=29500"]
    i = cmd.index("maspo_megatron.cli")
    assert cmd[i + 1:i + 4] == ["train", "--recipe", "maspo_r1_distill_7b"]
    # What the trainer receives parses into its config: 4 TP2 servers per 8-GPU node, reached at
    # the nodes' addresses; the weight-sync sender on this node advertises its own address.
    cfg = apply_overrides(load_recipe(args.recipe), cmd[i + 4:])
    assert cfg.rollout.server_urls == [f"http://10.0.0.{n}:{30000 + s}" for n in (1, 2) for s in range(4)]
    assert cfg.rollout.router_url == "http://10.0.0.1:30100"
    assert cfg.weight_sync.master_address == "10.0.1.2"
    assert cfg.data.prompt_template == TRICKY.split("=", 1)[1]


def test_weight_sync_port_flag_becomes_an_override_unless_the_user_set_one():
    plan = make_plan("maspo_r1_distill_7b", PATHS, train_nodes=2, train_gpus_per_node=8, rollout_nodes=1,
                     rollout_gpus_per_node=8, ports=Ports(weight_sync=29600))
    assert node.build_parser().parse_args(train_args(plan)).overrides == [*PATHS, "weight_sync.master_port=29600"]
    mine = [*PATHS, "weight_sync.master_port=29700"]
    plan = make_plan("maspo_r1_distill_7b", mine, train_nodes=2, train_gpus_per_node=8, rollout_nodes=1,
                     rollout_gpus_per_node=8, ports=Ports(weight_sync=29600))
    assert node.build_parser().parse_args(train_args(plan)).overrides == mine
    with pytest.raises(LaunchError, match="ports collide.*weight sync 29500"):
        make_plan("maspo_r1_distill_7b", PATHS, train_nodes=2, train_gpus_per_node=8, rollout_nodes=1,
                  rollout_gpus_per_node=8, ports=Ports(weight_sync=29500))


def test_train_node_fails_clearly_when_servers_never_come_up():
    url = "http://127.0.0.1:9"  # discard port: nothing answers
    with pytest.raises(node.NodeError, match=r"127\.0\.0\.1:9.*not healthy.*rollout_logs"):
        node.wait_for_rollouts([url], url, timeout_s=0.5)


def test_rollout_node_arguments_carry_the_recipes_server_spec():
    plan = _plan(overrides=[*PATHS, "rollout.mem_fraction_static=0.8", "rollout.dtype=bfloat16"])
    args = node.build_parser().parse_args(rollout_args(plan))
    spec = json.loads(args.server_spec)
    assert (spec["model_path"], spec["tp_size"], spec["mem_fraction_static"], spec["dtype"], spec["device"]) == \
        ("/models/r1-7b", 2, 0.8, "bfloat16", "cuda")
    assert (args.engine, args.num_gpus) == ("sglang", 8)
    assert args.log_dir == "outputs/maspo_r1_distill_7b/rollout_logs"
    cpu = node.build_parser().parse_args(rollout_args(make_plan(
        "tiny_cpu", ["model.path=/m", "data.train_path=/d"], train_nodes=1, train_gpus_per_node=2,
        rollout_nodes=1, rollout_gpus_per_node=1)))
    assert json.loads(cpu.server_spec)["device"] == "cpu"  # the CPU recipe runs SGLang's CPU engine


# --------------------------------------------------------------------------- slurm (dry run)


OPTS = dict(account="acct", partition="batch", train_image="nvcr.io/nvidia/nemo:train", job_dir="/lustre/jobs",
            rollout_image="lmsysorg/sglang:rollout", code_dir="/lustre/code", mounts=["/lustre/models:/models"],
            env={"NCCL_SOCKET_IFNAME": "ib0"})


@pytest.fixture(scope="module")
def sbatch():
    plan = _plan(overrides=[*PATHS, TRICKY], train_nodes=2, rollout_nodes=3)
    return slurm.render_sbatch(plan, slurm.SlurmOptions(**OPTS))


@pytest.fixture(scope="module")
def bare_sbatch():
    """No account, no images: bare-metal, as on the loopback test cluster."""
    plan = _plan(overrides=[*PATHS, TRICKY], train_nodes=2, rollout_nodes=1)
    # nemo-run makes <job>/code through invoke, which reads stdin: pytest's capture refuses that.
    stdin, sys.stdin = sys.stdin, open(os.devnull)
    try:
        return slurm.render_sbatch(plan, slurm.SlurmOptions(job_dir="/shared/jobs", monitor_wait_s=7))
    finally:
        sys.stdin.close()
        sys.stdin = stdin


def _sbatch_groups(script):
    header = [l for l in script.splitlines() if l.startswith("#SBATCH")]
    groups, current = [], []
    for line in header:
        if line == "#SBATCH hetjob":
            groups.append(current)
            current = []
        else:
            current.append(line)
    return groups + [current]


def _srun(script, group):
    line = next(l for l in script.splitlines() if l.startswith(f"srun --het-group={group} "))
    return shlex.split(line.split(" & pids[")[0])


def test_sbatch_is_a_two_group_het_job(sbatch):
    g0, g1 = _sbatch_groups(sbatch)
    assert "#SBATCH --nodes=3" in g0 and "#SBATCH --nodes=2" in g1
    for g in (g0, g1):
        assert {"#SBATCH --account=acct", "#SBATCH --partition=batch", "#SBATCH --gpus-per-node=8",
                "#SBATCH --ntasks-per-node=1", "#SBATCH --exclusive"} <= set(g)


def test_sbatch_runs_servers_and_trainer_in_their_images(sbatch):
    rollout, train = _srun(sbatch, 0), _srun(sbatch, 1)
    for argv, image in ((rollout, OPTS["rollout_image"]), (train, OPTS["train_image"])):
        assert argv[argv.index("--container-image") + 1] == image
        mounts = argv[argv.index("--container-mounts") + 1].split(",")
        assert "/lustre/models:/models" in mounts and "/lustre/code:/lustre/code" in mounts
    i = rollout.index("python")
    assert rollout[i:i + 4] == ["python", "-m", "launch.node", "rollout"]
    r = node.build_parser().parse_args(rollout[i + 3:])
    spec = json.loads(r.server_spec)
    assert (spec["model_path"], r.num_gpus, spec["tp_size"], r.server_port, r.router_port) == \
        ("/models/r1-7b", 8, 2, 30000, 30100)
    j = train.index("python")
    assert train[j:j + 4] == ["python", "-m", "launch.node", "train"]
    t = node.build_parser().parse_args(train[j + 3:])
    assert (t.recipe, t.nproc_per_node, t.servers_per_node) == ("maspo_r1_distill_7b", 8, 4)
    assert t.overrides == [*PATHS, TRICKY]  # quoting survived the shell line


def test_sbatch_without_images_or_account_runs_bare_metal_from_the_code_dir(bare_sbatch):
    g0, g1 = _sbatch_groups(bare_sbatch)
    assert not [l for l in g0 + g1 if "--account" in l]
    for group in (0, 1):
        argv = _srun(bare_sbatch, group)
        assert "--container-image" not in argv and "--container-mounts" not in argv
        chdir = argv[argv.index("--chdir") + 1]
        assert chdir.startswith("/shared/jobs/experiments/maspo/") and chdir.endswith("/code")
        # The launcher's own interpreter (a shared-filesystem venv), running the shipped launch/node.py.
        i = argv.index(sys.executable)
        assert argv[i + 1:i + 3] == ["-m", "launch.node"]
    # The group monitor checks every 7 s and ends the other group 7 s after the first one exits.
    assert bare_sbatch.count("sleep 7") == 2 and "sleep 60" not in bare_sbatch


def test_local_submission_stages_where_its_tunnel_submits_from(tmp_path):
    # nemo-run's LocalTunnel submits <job_dir>/<title>/<id>/<task>_sbatch.sh; the Experiment must
    # have written it there (DESIGN: else "sbatch: Unable to open file").
    opts = slurm.SlurmOptions(job_dir=str(tmp_path / "jobs"))
    tunnel = slurm._tunnel(opts)
    with slurm.experiment(opts, log_level="WARN") as exp:
        tunnel._set_job_dir(exp._id)
        assert tunnel.job_dir == exp._exp_dir


def test_sbatch_environment(sbatch):
    before_rollout, after_rollout = sbatch.split("srun --het-group=0 ", 1)
    for line in ("export SGLANG_RETURN_ORIGINAL_LOGPROB=0", "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                 "export NCCL_SOCKET_IFNAME=ib0"):
        assert line in before_rollout
    # Training-only settings are exported after the servers' srun, so they reach only the trainer.
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in before_rollout
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in after_rollout.split("srun --het-group=1 ")[0]


def _run_setup(tmp_path, env):
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "scontrol").write_text(textwrap.dedent("""\
        #!/bin/bash
        # scontrol show hostnames LIST: a bracket-free comma list, one name per line;
        # scontrol show node NAME: NodeAddr=10.0.0.<digits of NAME>, except for node "bare".
        if [ "$1 $2" = "show hostnames" ]; then [ -n "$3" ] && tr ',' '\\n' <<< "$3"; exit 0; fi
        if [ "$1 $2" = "show node" ]; then
          [ "$3" = bare ] && { echo "NodeName=bare State=IDLE"; exit 0; }
          echo "NodeName=$3 Arch=x86_64"; echo "   NodeAddr=10.0.0.${3//[!0-9]/} NodeHostName=$3"; exit 0
        fi
        exit 1
        """))
    (fake / "scontrol").chmod(0o755)
    script = slurm.SETUP_LINES + (f'\necho "R=${node.ENV_ROLLOUT_HOSTS} T=${node.ENV_TRAIN_HOSTS} '
                                  f'RA=${node.ENV_ROLLOUT_ADDRS} TA=${node.ENV_TRAIN_ADDRS}"\n')
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          env={"PATH": f"{fake}:{os.environ['PATH']}", **env})


def test_sbatch_resolves_het_group_hostnames_and_addresses(sbatch, tmp_path):
    assert slurm.SETUP_LINES in sbatch
    out = _run_setup(tmp_path, {"SLURM_JOB_NODELIST_HET_GROUP_0": "r1,r2",
                                "SLURM_JOB_NODELIST_HET_GROUP_1": "t1,t2,bare"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == \
        "R=r1,r2 T=t1,t2,bare RA=10.0.0.1,10.0.0.2 TA=10.0.0.1,10.0.0.2,bare"
    bad = _run_setup(tmp_path, {"SLURM_JOB_NODELIST_HET_GROUP_0": "r1"})
    assert bad.returncode != 0 and "no hostnames for het group 1 (training)" in bad.stderr


def test_slurm_cli_errors(capsys):
    base = ["--job-dir", "/j", "--rollout-nodes", "1", "--dry-run"]
    assert slurm.main(["--recipe", "maspo_r1_distill_7b", "--train-nodes", "0", *base, *PATHS]) == 2
    assert "--train-nodes must be a positive integer, got 0" in capsys.readouterr().err
    assert slurm.main(["--recipe", "nope", "--train-nodes", "1", *base, *PATHS]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    assert slurm.main(["--recipe", "maspo_qwen3_30b_a3b", "--train-nodes", "1", *base, *PATHS]) == 2
    assert "parallel.ep=8 must divide dp*cp = 4" in capsys.readouterr().err
    assert slurm.main(["--recipe", "maspo_r1_distill_7b", "--train-nodes", "2", *base, *PATHS,
                       "--env", "NOEQUALS"]) == 2
    assert "--env 'NOEQUALS' must look like KEY=VALUE" in capsys.readouterr().err
    assert slurm.main(["--recipe", "maspo_r1_distill_7b", "--train-nodes", "2", *base, *PATHS,
                       "--mount", "/a:/b"]) == 2
    assert "--mount needs a container image" in capsys.readouterr().err
    assert slurm.main(["--recipe", "maspo_r1_distill_7b", "--train-nodes", "2", *base, *PATHS,
                       "--monitor-wait", "0"]) == 2
    assert "--monitor-wait must be >= 1 second" in capsys.readouterr().err


# --------------------------------------------------------------------------- local


def test_local_tasks_split_gpus_and_share_hosts():
    plan = make_plan("maspo_r1_distill_7b", PATHS, train_nodes=1, train_gpus_per_node=6,
                     rollout_nodes=1, rollout_gpus_per_node=2)
    (rname, rargv, renv), (tname, targv, tenv) = local.local_tasks(plan, python="python")
    assert (rname, tname) == ("rollout", "train")
    assert rargv[1:3] == targv[1:3] == ["-m", "launch.node"]
    assert renv["CUDA_VISIBLE_DEVICES"] == "6,7" and tenv["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5"
    r = node.build_parser().parse_args(rargv[3:])
    t = node.build_parser().parse_args(targv[3:])
    assert (r.num_gpus, json.loads(r.server_spec)["tp_size"], r.node_rank, r.bind_host) == (2, 2, 0, "127.0.0.1")
    assert (t.nproc_per_node, t.servers_per_node) == (6, 1)
    for env in (renv, tenv):
        assert env[node.ENV_ROLLOUT_ADDRS] == env[node.ENV_TRAIN_ADDRS] == "127.0.0.1"
        assert env["PYTHONPATH"].split(os.pathsep)[0] == local.REPO  # launch.node from this checkout
    assert t.overrides == PATHS


def test_local_cli_errors(capsys):
    assert local.main(["--recipe", "maspo_r1_distill_7b", "--train-gpus", "0", "--rollout-gpus", "2", *PATHS]) == 2
    assert "--train-gpus must be a positive integer" in capsys.readouterr().err
    assert local.main(["--recipe", "maspo_r1_distill_7b", "--train-gpus", "3", "--rollout-gpus", "2",
                       "--dry-run", *PATHS]) == 2
    assert "3 ranks" in capsys.readouterr().err
