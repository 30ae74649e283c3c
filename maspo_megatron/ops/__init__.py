"""Vocab-parallel log-probs and entropy (torch autograd; only torch.distributed groups)."""

from .fused_linear import fused_linear_vocab_parallel_logprobs
from .sequence import response_logprobs_from_hidden, response_logprobs_from_logits
from .vocab_parallel import vocab_parallel_logprobs

__all__ = [
    "fused_linear_vocab_parallel_logprobs",
    "response_logprobs_from_hidden",
    "response_logprobs_from_logits",
    "vocab_parallel_logprobs",
]
