"""The demo's synthetic verifiable tasks, their tokenizer and a random-init model, all made locally.

Tasks (``SyntheticTaskConfig.task``); digits are drawn uniformly from 0..max_operand:
- "add" (default): the prompt is "a+b="; the answer is the last digit of a+b (one token).
- "copy": the prompt is "d=" (d a digit 0..9) and the answer is d.
- "shift": the prompt is ``num_digits`` digits then "=", e.g. "40213344="; the answer maps each
  digit d to (d + offset) mod 10, in order: "73546677" for offset 3. Every answer token is
  determined by one prompt token, a fixed distance back, so a tiny model can learn it, and the
  answer is long enough (8 tokens by default) for MASPO's per-token gate to act.

The reward ("synthetic", ``maspo_megatron.reward.synthetic``) is the fraction of answer
characters the response reproduces in place (1 or 0 for the one-token tasks), so a long answer
gives a random policy signal from its first steps.

Why it suits a CPU demo: the tokenizer is character-level over 16 tokens (4 special, 10 digits,
"+", "="), so a randomly initialised model — whose next-token distribution is close to uniform —
already earns about 1/16 reward, while the best policy earns 1. In a plain policy-gradient check
(2 layers, hidden 64, 32 prompts x 8 samples per step, Adam 1e-3) "add" with max_operand=4 went
from 0.08 to about 0.9 reward in 100 steps; with max_operand=9 (100 sums) it only reached ~0.19
after 1000 steps, so the larger table suits longer runs, not the CPU demo. In the same kind of
check with the per-digit reward (one Adam step per batch of 32 x 8) "shift" with 8 digits in
0..4 went from 0.05 to 0.59 in 60 steps at lr 2e-3, past the 0.2 that emitting the 5 possible
answer digits at random earns; with digits 0..9 it reached 0.39 after 120 steps at lr 1e-3. Two
harder 8-digit tasks did not learn there: addition with carries (digits 0..9, least significant
first) stayed at ~0.1 (any digit) after 120 steps, digit-wise addition mod 10 (digits 0..4) at
~0.21 after 50 steps, what always answering the commonest sum earns (0.2).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

__all__ = [
    "SyntheticTaskConfig",
    "make_synthetic_dataset",
    "make_demo_tokenizer",
    "make_demo_model",
    "DEMO_SPECIAL_TOKENS",
    "DEMO_ALPHABET",
]

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
DEMO_SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
DEMO_ALPHABET = tuple("0123456789+=")

# Roles are not marked: the prompt's trailing "=" is the cue to answer, and every extra token
# would lower the random policy's reward. An assistant turn ends with EOS.
DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


@dataclass
class SyntheticTaskConfig:
    """The synthetic dataset.

    task:      "add" (prompt "a+b=", answer (a+b) mod 10), "copy" (prompt "d=", answer d) or
               "shift" (prompt: num_digits digits and "="; answer: each digit + offset, mod 10).
    max_operand: largest operand of "add" and largest prompt digit of "shift" (0..9); "add"
               has (max_operand+1)**2 prompts.
    num_digits: digits in a "shift" prompt, hence tokens in its answer.
    offset:    what "shift" adds to each digit (mod 10); 0 makes it a copy task.
    num_train: training rows, drawn i.i.d.
    num_eval:  evaluation rows, drawn i.i.d. from the same distribution with another stream
               (the task has few distinct prompts, so eval measures fit, not generalisation).
    seed:      the dataset is a pure function of this config.
    """

    task: str = "add"
    max_operand: int = 4
    num_digits: int = 8
    offset: int = 3
    num_train: int = 2000
    num_eval: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in ("add", "copy", "shift"):
            raise ValueError(f"synthetic task must be 'add', 'copy' or 'shift', got {self.task!r}")
        if not 0 <= self.max_operand <= 9:
            raise ValueError(f"synthetic max_operand must be a digit (0..9), got {self.max_operand}")
        if self.num_train <= 0 or self.num_eval < 0:
            raise ValueError(f"synthetic num_train must be > 0 and num_eval >= 0, got {self.num_train}, {self.num_eval}")
        if self.num_digits < 1:
            raise ValueError(f"synthetic num_digits must be >= 1, got {self.num_digits}")
        if not 0 <= self.offset <= 9:
            raise ValueError(f"synthetic offset must be a digit (0..9), got {self.offset}")

    @property
    def answer_tokens(self) -> int:
        """Tokens in every answer (one character each): what ``max_new_tokens`` must cover."""
        return self.num_digits if self.task == "shift" else 1


def _row(config: SyntheticTaskConfig, rng: random.Random) -> dict[str, str]:
    if config.task == "add":
        a, b = rng.randint(0, config.max_operand), rng.randint(0, config.max_operand)
        return {"prompt": f"{a}+{b}=", "answer": str((a + b) % 10)}
    if config.task == "shift":
        digits = [rng.randint(0, config.max_operand) for _ in range(config.num_digits)]
        return {"prompt": "".join(map(str, digits)) + "=",
                "answer": "".join(str((d + config.offset) % 10) for d in digits)}
    d = rng.randint(0, 9)
    return {"prompt": f"{d}=", "answer": str(d)}


def make_synthetic_dataset(out_dir: str, config: SyntheticTaskConfig = SyntheticTaskConfig()) -> tuple[str, str]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (fields "prompt", "answer") into ``out_dir``.

    Returns their paths. Deterministic in ``config``.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for split, count, stream in (("train", config.num_train, 0), ("eval", config.num_eval, 1)):
        rng = random.Random(f"{config.seed}:{stream}")
        path = os.path.join(out_dir, f"{split}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(count):
                f.write(json.dumps(_row(config, rng)) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def make_demo_tokenizer(out_dir: str | None = None):
    """A character-level HF fast tokenizer over the task alphabet, with a chat template.

    Saved with ``save_pretrained(out_dir)`` when ``out_dir`` is given, so that
    ``AutoTokenizer.from_pretrained(out_dir)`` loads it. Plain encoding adds BOS.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(DEMO_SPECIAL_TOKENS + DEMO_ALPHABET)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.add_special_tokens(list(DEMO_SPECIAL_TOKENS))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    backend.decoder = decoders.Fuse()  # join characters without spaces
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    tokenizer.chat_template = DEMO_CHAT_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def make_demo_model(
    out_dir: str,
    tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    family: str = "llama",
    intermediate_size: int | None = None,
    max_position_embeddings: int = 64,
):
    """Write a randomly initialised HF model (config.json + model.safetensors) and ``tokenizer``
    into ``out_dir``. ``family`` is "llama" or "qwen2"; ``intermediate_size`` defaults to
    4 * hidden_size. Weights are float32 and a pure function of the arguments. Returns the model.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if family not in classes:
        raise ValueError(f"demo model family must be one of {sorted(classes)}, got {family!r}")
    if hidden_size % heads or heads % kv_heads:
        raise ValueError(
            f"demo model needs hidden_size divisible by heads and heads by kv_heads, got {hidden_size}, {heads}, {kv_heads}"
        )
    config_cls, model_cls = classes[family]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return model
