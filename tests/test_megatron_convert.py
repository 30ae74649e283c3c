"""Single-process checks of the conversion building blocks (the multi-process parity, round-trip
and broken-checkpoint tests live in test_megatron_model.py, sharing one process spawn)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from maspo_megatron.megatron import convert
from maspo_megatron.megatron.convert import CheckpointError, HFCheckpoint
from maspo_megatron.tensors import bucket_named_tensors
from maspo_megatron.megatron.families import ArchConfig, ParamRule, RopeConfig, ShardKind


def _arch(heads=4, groups=2, head_dim=3, hidden=5) -> ArchConfig:
    return ArchConfig(num_layers=1, hidden_size=hidden, ffn_hidden_size=6, num_attention_heads=heads,
                      num_query_groups=groups, head_dim=head_dim, vocab_size=10, max_position_embeddings=8,
                      norm_eps=1e-6, rope=RopeConfig(theta=1e4), tie_word_embeddings=False)


def _megatron_heads(fused_w: torch.Tensor, x: torch.Tensor, arch: ArchConfig):
    """q, k, v heads the way megatron's SelfAttention.get_query_key_value_tensors derives them
    from linear_qkv's output (TP=1): view [ng, (np/ng + 2) * hn], split [np/ng*hn, hn, hn]."""
    qpg, d = arch.num_attention_heads // arch.num_query_groups, arch.head_dim
    mixed = (x @ fused_w.T).view(arch.num_query_groups, (qpg + 2) * d)
    q, k, v = torch.split(mixed, [qpg * d, d, d], dim=1)
    return q.reshape(-1, d), k, v


@pytest.mark.parametrize(("heads", "groups"), [(4, 2), (4, 4), (4, 1)])
def test_fused_qkv_matches_megatron_attention_layout(heads, groups):
    arch = _arch(heads, groups)
    d, h = arch.head_dim, arch.hidden_size
    torch.manual_seed(0)
    wq, wk, wv = (torch.randn(n * d, h, dtype=torch.float64) for n in (heads, groups, groups))
    x = torch.randn(h, dtype=torch.float64)
    q, k, v = _megatron_heads(convert._fuse_qkv(wq, wk, wv, arch), x, arch)
    # HF: query head i uses k/v head i // (heads / groups) (repeat_kv); megatron's group g holds
    # query heads g*heads/groups ... and k/v head g, so heads must come out in HF order.
    torch.testing.assert_close(q, (wq @ x).view(heads, d))
    torch.testing.assert_close(k, (wk @ x).view(groups, d))
    torch.testing.assert_close(v, (wv @ x).view(groups, d))
    for got, want in zip(convert._split_qkv(convert._fuse_qkv(wq, wk, wv, arch), arch), (wq, wk, wv)):
        assert torch.equal(got, want)


class _CountingCheckpoint(HFCheckpoint):
    def __init__(self, path):
        super().__init__(path)
        self.elements_read = 0

    def read(self, name, dim=None, start=0, end=None):
        out = super().read(name, dim, start, end)
        self.elements_read += out.numel()
        return out


@pytest.mark.parametrize(("kind", "tp", "groups"), [
    (ShardKind.QKV, 2, 2), (ShardKind.QKV, 4, 4), (ShardKind.QKV, 2, 1),
    (ShardKind.GATE_UP, 2, 2), (ShardKind.COLUMN, 3, 2), (ShardKind.ROW, 3, 2), (ShardKind.VOCAB, 4, 2),
])
def test_sliced_import_reads_only_this_ranks_rows(tmp_path, kind, tp, groups):
    """Each TP rank's shard equals the slice of the full fused tensor, and together the ranks
    read each HF element once (plus at most one shared query group when groups < TP)."""
    arch = _arch(heads=4, groups=groups)
    d, h, f, v = arch.head_dim, arch.hidden_size, arch.ffn_hidden_size, arch.vocab_size
    torch.manual_seed(1)
    hf = {"q": torch.randn(4 * d, h), "k": torch.randn(groups * d, h), "v": torch.randn(groups * d, h),
          "gate": torch.randn(f, h), "up": torch.randn(f, h), "o": torch.randn(h, 6), "emb": torch.randn(v, h)}
    save_file(hf, tmp_path / "model.safetensors")
    padded = 12
    names, full = {
        ShardKind.QKV: (("q", "k", "v"), convert._fuse_qkv(hf["q"], hf["k"], hf["v"], arch)),
        ShardKind.GATE_UP: (("gate", "up"), None),
        ShardKind.COLUMN: (("gate",), hf["gate"]),
        ShardKind.ROW: (("o",), hf["o"]),
        ShardKind.VOCAB: (("emb",), torch.cat([hf["emb"], torch.zeros(padded - v, h)])),
    }[kind]
    rule = ParamRule("p", names, kind, ())
    spec = SimpleNamespace(arch=arch, vocab_size=v)
    shards = []
    with _CountingCheckpoint(tmp_path) as ckpt:
        for rank in range(tp):
            shape = {ShardKind.QKV: (full.shape[0] // tp, h) if full is not None else None,
                     ShardKind.GATE_UP: (2 * f // tp, h), ShardKind.COLUMN: (f // tp, h), ShardKind.ROW: (h, 6 // tp),
                     ShardKind.VOCAB: (padded // tp, h)}[kind]
            param = torch.empty(shape)
            shards.append(convert._read_shard(ckpt, convert._Bound("p", param, rule, names), spec, rank, tp))
            assert shards[-1].shape == param.shape
        read = ckpt.elements_read
    if kind is ShardKind.GATE_UP:
        # Per rank [gate_r; up_r]: megatron's SwiGLU chunks the local fc1 output in two.
        for rank, shard in enumerate(shards):
            gate, up = shard.chunk(2)
            rows = slice(rank * f // tp, (rank + 1) * f // tp)
            assert torch.equal(gate, hf["gate"][rows]) and torch.equal(up, hf["up"][rows])
    else:
        assert torch.equal(torch.cat(shards, dim=1 if kind is ShardKind.ROW else 0), full)
    total = sum(hf[n].numel() for n in names)
    group_extra = 0 if groups >= tp else (tp - 1) * (4 // groups + 2) * d * h
    assert read <= total + group_extra


def test_bucketing_keeps_order_and_limits():
    tensors = [(f"t{i}", torch.zeros(n, dtype=torch.float32)) for i, n in enumerate([10, 10, 30, 5, 100, 1])]
    buckets = list(bucket_named_tensors(tensors, bucket_bytes=100))  # 25 floats per bucket
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4"], ["t5"]]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(bucket_named_tensors(tensors, 0))


def test_checkpoint_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json or model.safetensors"):
        HFCheckpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-1.safetensors"}}')
    with pytest.raises(CheckpointError, match="lists model-1.safetensors, which does not exist"):
        HFCheckpoint(tmp_path)
    save_file({"a": torch.arange(6.0).view(3, 2)}, tmp_path / "model-1.safetensors")
    with HFCheckpoint(tmp_path) as ckpt:
        assert ckpt.shape("a") == (3, 2)
        assert torch.equal(ckpt.read("a", 0, 1, 3), torch.arange(2.0, 6.0).view(2, 2))
        assert torch.equal(ckpt.read("a", 1, 1, 2), torch.tensor([[1.0], [3.0], [5.0]]))
        with pytest.raises(CheckpointError, match="missing tensor 'model.norm.weight'"):
            ckpt.shape("model.norm.weight")
