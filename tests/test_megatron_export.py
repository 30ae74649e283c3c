"""export-hf: a checkpoint saved at TP=2 (padded vocabulary) exported at TP=1 gives the trained weights."""

import torch

from distributed import run_distributed
from test_megatron_actor import make_tiny_llama


def save_perturbed(rank, world_size, model_dir, ckpt_dir):
    from maspo_megatron.megatron.checkpoint import save_checkpoint
    from maspo_megatron.megatron.convert import export_hf, load_hf_checkpoint
    from maspo_megatron.megatron.model import build_model
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel, initialize_parallel

    parallel = ParallelConfig(tp=2)
    initialize_parallel(parallel)
    # 50 tokens padded to a multiple of 16 * tp = 32: 64 rows, which TP=1 would not choose.
    chunks = build_model(model_dir, parallel, dtype=torch.float32, make_vocab_size_divisible_by=16)
    load_hf_checkpoint(chunks, model_dir)
    g = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    save_checkpoint(ckpt_dir, 7, chunks, None)
    trained = {k: v.clone() for k, v in export_hf(chunks)}
    destroy_parallel()
    return trained


def export(rank, world_size, ckpt_dir, model_dir, out_dir):
    from maspo_megatron.megatron.export import export_checkpoint_to_hf

    export_checkpoint_to_hf(ckpt_dir, model_dir, out_dir, tp=1, dtype=torch.float32)


def test_export_hf_from_tp2_checkpoint_at_tp1(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    model_dir, ckpt, out = str(tmp_path / "hf"), str(tmp_path / "ckpt"), str(tmp_path / "out")
    make_tiny_llama(model_dir)
    trained = run_distributed(save_perturbed, 2, model_dir, ckpt)[0]
    run_distributed(export, 1, ckpt, model_dir, out)
    exported = load_file(f"{out}/model.safetensors")
    original = load_file(f"{model_dir}/model.safetensors")
    assert exported.keys() == trained.keys() == original.keys()
    for name, tensor in trained.items():
        assert torch.equal(exported[name], tensor), name
        assert not torch.equal(exported[name], original[name]), name
    assert AutoConfig.from_pretrained(out).vocab_size == 50
