import pytest
import torch

from maspo_megatron.runtime import ParallelConfig, cpu_mode


def test_parallel_config_returns_dp_size():
    assert ParallelConfig(tp=2, pp=2).validate(8) == 2


@pytest.mark.parametrize(
    "cfg, world, message",
    [
        (ParallelConfig(tp=3), 4, "not divisible by tp\\*pp\\*cp"),
        (ParallelConfig(tp=2, ep=4), 4, "parallel.ep=4 must divide"),
    ],
)
def test_parallel_config_rejects_bad_layouts(cfg, world, message):
    with pytest.raises(ValueError, match=message):
        cfg.validate(world)


def test_parallel_config_rejects_bad_sizes_when_built():
    # As every config section does (__post_init__), so a bad value stops before any process starts.
    with pytest.raises(ValueError, match="parallel.tp must be a positive integer, got 0"):
        ParallelConfig(tp=0)
    with pytest.raises(ValueError, match="parallel.vpp must be None or a positive integer"):
        ParallelConfig(vpp=0)
    with pytest.raises(ValueError, match=r"parallel.vpp=2 needs parallel.pp >= 2"):
        ParallelConfig(vpp=2)
    assert ParallelConfig(pp=2, vpp=2).vpp == 2


def test_cpu_mode_refuses_a_visible_gpu(monkeypatch):
    monkeypatch.setattr(cpu_mode, "_ENABLED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA device is visible"):
        cpu_mode.enable_cpu_mode()
