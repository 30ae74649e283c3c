"""runtime/noise.py: which upstream warnings and log lines are dropped, and on which ranks.

The end-to-end check (a 2-rank run's stderr) is in test_readme_own_data.py.
"""

from __future__ import annotations

import logging
import warnings

import pytest

from maspo_megatron.runtime.noise import quiet_upstream_noise

TE_MISSING = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
DEPRECATED = "full scope is deprecated. Use empty cuda_graph_modules to capture the whole layer."


def shown(rank: int, cuda: bool, monkeypatch) -> list[str]:
    monkeypatch.setattr("torch.cuda.is_available", lambda: cuda)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_upstream_noise(rank)
        for message in (TE_MISSING, DEPRECATED, "a warning of this run"):
            warnings.warn(message, UserWarning)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("rank, cuda, te_shown", [(0, False, False), (1, False, False), (0, True, True),
                                                  (1, True, False)])
def test_gpu_only_fallbacks_show_on_gpu_rank_0_only_and_deprecations_nowhere(rank, cuda, te_shown, monkeypatch):
    expected = ([TE_MISSING] if te_shown else []) + ["a warning of this run"]
    assert shown(rank, cuda, monkeypatch) == expected


def test_log_records_dropped_by_message_on_their_own_logger(caplog):
    quiet_upstream_noise(0)
    quiet_upstream_noise(0)  # idempotent: one filter per logger
    gpt = logging.getLogger("megatron.core.models.gpt.gpt_model")
    assert len(gpt.filters) == 1
    with caplog.at_level(logging.WARNING):
        gpt.warning("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
        gpt.warning("something else about the model")
        logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/x")
        logging.getLogger("megatron.core.distributed.distributed_data_parallel").warning(
            "DistributedDataParallel: full_param_layout not provided with use_distributed_optimizer=True.")
    assert [r.getMessage() for r in caplog.records] == ["something else about the model"]
