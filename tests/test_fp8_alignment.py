"""FP8 details checkable without Transformer Engine.

- Micro-batch token counts are multiples of what TE's FP8 GEMMs need (16; per TP rank under
  sequence parallelism), padded and packed: the actor's own micro-batching, with FP8 set on a
  stand-in config (TE cannot be imported here), and the real actor on CPU with the padding
  forced on gives the same log-probs and loss as without it.
- FP8 asked on a machine without TE fails at start-up, before torchrun, in one line naming
  ``model.fp8``.
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from distributed import run_distributed
from maspo_megatron.megatron.actor import (
    FP8_TOKEN_MULTIPLE,
    Actor,
    ActorConfig,
    SequenceBatch,
    pad_micro_batch,
    token_multiple,
)


def test_token_multiple():
    assert FP8_TOKEN_MULTIPLE == 16
    assert token_multiple(fp8=False, sequence_parallel=False, tp=4) == 1
    assert token_multiple(fp8=True, sequence_parallel=False, tp=4) == 16
    assert token_multiple(fp8=False, sequence_parallel=True, tp=4) == 4
    # Sequence parallelism splits the tokens over TP; each rank's share must be a multiple of 16.
    assert token_multiple(fp8=True, sequence_parallel=True, tp=8) == 128


def test_pad_micro_batch_pads_after_the_tokens():
    ids = torch.arange(1, 11).reshape(2, 5)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    micro = {"input_ids": ids, "response_mask": mask, "advantages": torch.tensor([1.0, -1.0]),
             "old_logprobs": -torch.rand(2, 5)}
    out = pad_micro_batch(micro, 16)
    assert out["input_ids"].shape == out["response_mask"].shape == out["old_logprobs"].shape == (2, 16)
    assert torch.equal(out["input_ids"][:, :5], ids) and not out["input_ids"][:, 5:].any()
    assert torch.equal(out["response_mask"][:, :5], mask) and not out["response_mask"][:, 5:].any()
    assert out["response_mask"].dtype == torch.bool
    assert torch.equal(out["old_logprobs"][:, :5], micro["old_logprobs"])
    assert torch.equal(out["advantages"], micro["advantages"])  # per-sequence: untouched
    assert pad_micro_batch(micro, 1) is micro
    assert pad_micro_batch(out, 16) is out


def _batch(n=13, max_len=37, seed=0) -> SequenceBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, max_len + 1, (n,), generator=g)
    ids = torch.randint(1, 50, (n, max_len), generator=g)
    pos = torch.arange(max_len)[None]
    mask = (pos >= 2) & (pos < lengths[:, None])
    return SequenceBatch(input_ids=ids, lengths=lengths, response_mask=mask,
                         advantages=torch.randn(n, generator=g), old_logprobs=-torch.rand(n, max_len, generator=g))


def _stand_in(*, pack: bool, fp8: bool, sp: bool, tp: int):
    """What ``Actor._micro_batches`` reads (a rank's share, one model chunk), with a
    TransformerConfig-like FP8 setting (a real one with fp8 set needs TE)."""
    return SimpleNamespace(
        cfg=ActorConfig(micro_batch_tokens=120), pack=pack, interleaved=False, pp_size=1,
        token_multiple=token_multiple(fp8=fp8, sequence_parallel=sp, tp=tp), replay=None,
    )


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("sp, tp", [(False, 1), (True, 2), (True, 8)])
def test_fp8_micro_batches_have_token_counts_te_accepts(pack, sp, tp):
    batch = _batch()
    for index in (torch.arange(len(batch)), torch.arange(len(batch))[1::2]):
        actor = _stand_in(pack=pack, fp8=True, sp=sp, tp=tp)
        micro = Actor._micro_batches(actor, batch, index)
        assert len(micro) > 1
        for m in micro:
            ids = m["packed"].input_ids if pack else m["input_ids"]
            tokens = ids.numel()
            assert tokens % (tp if sp else 1) == 0
            assert (tokens // (tp if sp else 1)) % 16 == 0, (pack, sp, tp, ids.shape)
            # The real tokens are all there, unchanged.
            rows = m["rows"]
            for i, row in enumerate(rows.tolist()):
                n = int(batch.lengths[row])
                assert torch.equal(m["input_ids"][i, :n], batch.input_ids[row, :n])
            assert int(m["response_mask"].sum()) == int(batch.response_mask[rows].sum())


def test_without_fp8_or_sequence_parallelism_nothing_is_padded():
    batch = _batch()
    for m in Actor._micro_batches(_stand_in(pack=False, fp8=False, sp=False, tp=1), batch, torch.arange(len(batch))):
        assert m["input_ids"].shape[1] == int(batch.lengths[m["rows"]].max())


def padded_vs_unpadded(rank, world_size, model_dir):
    from maspo_megatron.algo.objective import Objective
    from maspo_megatron.megatron.actor import OptimizerConfig
    from maspo_megatron.megatron.convert import load_hf_checkpoint
    from maspo_megatron.megatron.model import build_model
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel, initialize_parallel

    parallel = ParallelConfig()
    initialize_parallel(parallel)
    out = {}
    for multiple in (1, FP8_TOKEN_MULTIPLE):
        torch.manual_seed(0)
        chunks = build_model(model_dir, parallel, dtype=torch.float32)
        load_hf_checkpoint(chunks, model_dir)
        cfg = ActorConfig(micro_batch_tokens=40, optimizer=OptimizerConfig(lr=1e-3))
        actor = Actor(chunks, cfg, objective=Objective(cfg))
        assert actor.token_multiple == 1  # no FP8 on CPU; forced below, as FP8 would set it
        actor.token_multiple = multiple
        batch = _batch(n=8, max_len=12)
        widths = [m["input_ids"].shape[1] for m in actor._micro_batches(batch, torch.arange(len(batch)))]
        batch.old_logprobs, ent = actor.compute_logprobs(batch, entropy=True)
        out[multiple] = {"lp": batch.old_logprobs, "ent": ent, "widths": widths,
                         "train": [actor.train_step(batch) for _ in range(2)]}
    destroy_parallel()
    return out


@pytest.mark.slow
def test_padding_to_the_fp8_multiple_changes_nothing_in_the_real_actor(tmp_path):
    from test_megatron_actor import make_tiny_llama

    make_tiny_llama(tmp_path)
    (out,) = run_distributed(padded_vs_unpadded, 1, str(tmp_path))
    plain, padded = out[1], out[FP8_TOKEN_MULTIPLE]
    assert all(w % 16 == 0 for w in padded["widths"]) and any(w % 16 for w in plain["widths"])
    assert max(padded["widths"]) > 12  # padding past the batch's own width is trimmed on the way back
    torch.testing.assert_close(padded["lp"], plain["lp"], atol=1e-6, rtol=0)
    torch.testing.assert_close(padded["ent"], plain["ent"], atol=1e-6, rtol=0)
    for a, b in zip(padded["train"], plain["train"]):
        assert a["response_tokens"] == b["response_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-6)


def test_fp8_without_transformer_engine_fails_before_torchrun_in_one_line(tmp_path):
    from maspo_megatron.megatron.model import te_available

    if te_available():
        pytest.skip("Transformer Engine is here: FP8 would start")
    (tmp_path / "train.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "maspo_megatron.cli", "train", "--recipe", "maspo_llama3_70b_fp8",
         f"model.path={tmp_path}", f"data.train_path={tmp_path / 'train.jsonl'}"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("maspo-megatron")]
    assert len(lines) == 1 and "model.fp8='hybrid'" in lines[0] and "Transformer Engine" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "torch.distributed.run" not in proc.stderr
