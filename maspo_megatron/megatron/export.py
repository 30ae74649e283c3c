"""``maspo-megatron export-hf``: a training checkpoint -> a Hugging Face directory."""

from __future__ import annotations

import torch

from maspo_megatron.megatron.checkpoint import load_checkpoint, vocab_multiple_for
from maspo_megatron.megatron.convert import save_hf
from maspo_megatron.megatron.model import build_model, load_hf_config


def export_checkpoint_to_hf(ckpt_dir: str, hf_model_dir: str, out_dir: str, *, tp: int = 1, pp: int = 1,
                            dtype: torch.dtype = torch.bfloat16) -> None:
    """Loads the newest checkpoint of ``ckpt_dir`` at layout (tp, pp) and writes ``out_dir``.

    ``hf_model_dir`` is the model the run started from: its config and tokenizer files are
    copied. Collective: run under torchrun with ``tp * pp`` processes (any layout loads, since
    dist-checkpointing reshards). The weights are written in ``dtype``.
    """
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel, initialize_parallel

    parallel = ParallelConfig(tp=tp, pp=pp)
    initialize_parallel(parallel)
    try:
        # fp32 parameters hold the trained values exactly whatever the training dtype was.
        chunks = build_model(hf_model_dir, parallel, dtype=torch.float32,
                             make_vocab_size_divisible_by=vocab_multiple_for(ckpt_dir, tp))
        state = load_checkpoint(ckpt_dir, chunks)
        save_hf(chunks, out_dir, load_hf_config(hf_model_dir), tokenizer_dir=hf_model_dir, dtype=dtype)
        if torch.distributed.get_rank() == 0:
            print(f"export-hf: step {state['step']} of {ckpt_dir} -> {out_dir}", flush=True)
    finally:
        destroy_parallel()
