"""A recipe at toy scale: the same run, small enough for a CPU (CI, or a smoke test before a job).

:func:`shrink` takes a recipe's ``TrainerConfig`` and changes only

- **model size**: a tiny random-init Hugging Face model of the recipe's own family and quirks
  (:func:`make_toy_model` from the recipe module's ``HF_CONFIG``: architecture, biases, tied
  embeddings, RoPE type and scaling are kept; widths, depth, vocabulary and context shrink);
- **layout**: TP and PP capped at 2 (what 2-4 CPU processes give), one data-parallel pair when
  the recipe has no model parallelism (the recipe is data-parallel at scale), SGLang TP 1; an
  expert-parallel recipe (MoE) keeps EP at 2 and PP up to 2 and runs at TP 1 (see
  :func:`toy_layout`);
- **experts** (MoE): 4 experts, top-2, expert width 32, every routing setting of the recipe's
  ``HF_CONFIG`` kept (probability renormalisation, aux-loss coefficient, sparse-layer pattern);
- **batch**: prompts per step, samples per prompt, mini-batches, response length (and with it
  the overlong buffer in proportion), prompt length and the micro-batch token budget in the
  recipe's proportion to a sequence;
- **precision**: fp32 on a CPU, and FP8 and sequence parallelism off, because both need
  Transformer Engine on a GPU (megatron-core's layer spec without TE refuses sequence
  parallelism; what of FP8 can be checked without TE is, in ``tests/test_fp8_alignment.py``);
- **machine**: reward worker processes, and the rollout servers' deployment settings (engine,
  device, server count, ...), which come from the ``tiny_cpu`` recipe: whatever the CPU demo
  runs on, the toy run runs on;

and keeps everything else: loss and its settings, optimizer and schedule, aggregation,
advantage estimator, dynamic sampling, overlong penalty, temperature and top-p/top-k, KL and
entropy coefficients, checkpoint and eval intervals. :func:`toy_overrides` writes the same change
as ``key=value`` overrides, so the toy run is ``maspo-megatron train --recipe NAME <overrides>``.

The data (:func:`make_toy_math_data`) and tokenizer (:func:`make_toy_tokenizer`) are made for
the math reward: answers are small integers and the tokenizer has one token per
``\\boxed{0}`` ... ``\\boxed{4}``, so a random policy earns reward on about one response in ten —
groups disagree, dynamic sampling keeps them, and the loss has something to act on.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
from typing import Any

TOY_TP_MAX = 2
TOY_PP_MAX = 2
TOY_PROMPTS_PER_STEP = 4
TOY_SAMPLES_PER_PROMPT = 8
TOY_MAX_NEW_TOKENS = 16
TOY_MAX_PROMPT_LEN = 128
TOY_REWARD_WORKERS = 2
TOY_STEPS = 2

TOY_EP_MAX = 2

# Widths of the toy model: head_dim 16, two KV heads (TP <= 2 divides them). Its depth is 2
# layers per stage at the deepest toy pipeline, whatever the recipe's layout: recipes of one
# family are then one toy model and share one rollout server in CI (the Qwen3-MoE toys at PP1 and
# PP2 too).
TOY_HIDDEN, TOY_HEADS, TOY_KV_HEADS, TOY_FFN, TOY_LAYERS_PER_STAGE = 64, 4, 2, 128, 2
TOY_LAYERS = TOY_LAYERS_PER_STAGE * TOY_PP_MAX
# The toy MoE: 4 experts (>= 4, so top-2 routing still chooses, and EP 2 holds 2 per rank).
TOY_EXPERTS, TOY_TOPK, TOY_MOE_FFN = 4, 2, 32
MOE_SIZE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")

SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "vocab_size", "max_window_layers", "layer_types",
             "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype")
NUMERIC_KEYS = ("rope_theta", "rms_norm_eps", "max_position_embeddings", "initializer_range")
"""``HF_CONFIG`` keys the toy model replaces (sizes) or leaves at the family's defaults (values
that select no code path; left out, the R1-Distill 1.5B/7B/14B toys are one model and share one
rollout server in CI). Every other key — architecture, biases, tied embeddings, RoPE type and
scaling, activation, sliding window — is kept as the recipe gives it."""
TOY_MAX_POSITIONS = 4096

ROLLOUT_RECIPE_KEYS = ("n_samples", "sampling", "temperature", "top_p", "top_k", "max_new_tokens",
                       "client", "server_urls", "router_url", "routing_replay")
"""``rollout`` fields that are the recipe's (sampling, group size, client retries) or the
caller's (attached servers); every other rollout field is the machine's and comes from tiny_cpu."""

SHRUNK_KEYS = frozenset({
    "model.path", "data.train_path", "output_dir", "steps",                      # the run
    "model.dtype", "model.fp8", "model.sequence_parallel",                       # precision, layout
    "parallel.tp", "parallel.pp", "parallel.ep", "parallel.etp",                 # layout
    "prompts_per_step", "rollout.n_samples", "actor.num_mini_batches",           # batch
    "rollout.sampling.max_new_tokens", "rollout.max_new_tokens", "data.max_prompt_len",
    "algorithm.overlong.max_response_length", "algorithm.overlong.buffer_length",
    "actor.micro_batch_tokens",                                                  # tokens
    "reward.num_workers",                                                        # machine
})
"""Every key :func:`shrink` may change, besides the rollout deployment fields (``rollout.*`` not
in ``ROLLOUT_RECIPE_KEYS``, plus ``rollout.server_urls``/``router_url``)."""

BOXED_ANSWERS = tuple(str(i) for i in range(5))


def may_shrink(key: str) -> bool:
    """Whether :func:`shrink` is allowed to change config key ``key``."""
    if key in SHRUNK_KEYS:
        return True
    if key.startswith("rollout."):
        field = key.split(".")[1]
        return field in ("server_urls", "router_url") or field not in ROLLOUT_RECIPE_KEYS
    return False


# ----------------------------------------------------------------------------- config


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _set(cfg: Any, key: str, value: Any) -> None:
    *parents, name = key.split(".")
    obj = cfg
    for part in parents:
        obj = getattr(obj, part)
    if not any(f.name == name for f in dataclasses.fields(obj)):
        raise KeyError(f"{key}: no such config field")
    object.__setattr__(obj, name, value)


def _has(cfg: Any, key: str) -> bool:
    try:
        _get(cfg, key)
        return True
    except AttributeError:
        return False


def _max_new_tokens_key(cfg) -> str:
    # rollout.sampling.max_new_tokens (SamplingConfig section) or rollout.max_new_tokens.
    return "rollout.sampling.max_new_tokens" if _has(cfg, "rollout.sampling.max_new_tokens") \
        else "rollout.max_new_tokens"


def toy_layout(tp: int, pp: int, ep: int = 1) -> tuple[int, int, int, int]:
    """(tp, pp, ep, processes) of the toy run: TP and PP capped at 2; a layout without model
    parallelism gets two data-parallel ranks (so the distributed optimizer shards over DP).

    Expert parallelism (``ep > 1``, an MoE recipe) is capped at 2 and runs at TP 1: megatron's
    MoE layer refuses TP > 1 without sequence parallelism in training, and sequence parallelism
    needs Transformer Engine (see :func:`shrink`). EP ranks are data-parallel ranks of the dense
    part, so the world is PP x EP: 2 or 4 processes.
    """
    if ep > 1:
        pp, ep = min(pp, TOY_PP_MAX), min(ep, TOY_EP_MAX)
        return 1, pp, ep, pp * ep
    tp, pp = min(tp, TOY_TP_MAX), min(pp, TOY_PP_MAX)
    dp = 2 if tp * pp == 1 else 1
    return tp, pp, 1, tp * pp * dp


def shrink(cfg, *, model_path: str, train_path: str, output_dir: str,
           server_urls: list[str] | None = None, cpu=None, steps: int = TOY_STEPS):
    """The recipe ``cfg`` at toy scale (a copy; see the module docstring for what changes).

    ``cpu``: the TrainerConfig whose rollout deployment to use (default: the ``tiny_cpu``
    recipe). ``server_urls``: running servers of the toy model to attach to. Returns
    ``(config, processes)``: run it on that many processes.
    """
    from maspo_megatron.config import revalidate

    if cpu is None:
        from maspo_megatron.cli import load_recipe

        cpu = load_recipe("tiny_cpu")
    out = copy.deepcopy(cfg)
    # Paths and length.
    _set(out, "model.path", model_path)
    _set(out, "data.train_path", train_path)
    _set(out, "output_dir", output_dir)
    _set(out, "steps", steps)
    # Precision: the CPU computes fp32; FP8 needs Transformer Engine on a GPU.
    _set(out, "model.dtype", "fp32")
    _set(out, "model.fp8", None)
    # Layout. Sequence parallelism needs TE too: megatron-core's local layer spec (the one
    # without TE) asserts "sequence parallel not supported by torch LayerNorm".
    tp, pp, ep, procs = toy_layout(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)
    _set(out, "parallel.tp", tp)
    _set(out, "parallel.pp", pp)
    _set(out, "parallel.ep", ep)
    if cfg.parallel.etp is not None:  # None follows TP, as in the recipe
        _set(out, "parallel.etp", min(cfg.parallel.etp, tp))
    _set(out, "model.sequence_parallel", False)
    # Batch: prompts, samples, mini-batches (each with whole groups, as at scale).
    prompts = min(cfg.prompts_per_step, TOY_PROMPTS_PER_STEP)
    samples = min(cfg.rollout.n_samples, TOY_SAMPLES_PER_PROMPT)
    minis = max(1, min(cfg.actor.num_mini_batches, prompts // 2))
    while prompts % minis or samples % minis:
        minis -= 1
    _set(out, "prompts_per_step", prompts)
    _set(out, "rollout.n_samples", samples)
    _set(out, "actor.num_mini_batches", minis)
    # Tokens: response and prompt lengths; the overlong buffer and the micro-batch budget keep
    # their proportions to them.
    new_key = _max_new_tokens_key(cfg)
    max_new = _get(cfg, new_key)
    toy_new = min(max_new, TOY_MAX_NEW_TOKENS)
    _set(out, new_key, toy_new)
    overlong = cfg.algorithm.overlong
    if overlong.max_response_length == max_new:
        _set(out, "algorithm.overlong.max_response_length", toy_new)
    if overlong.buffer_length:
        buffer = max(1, round(toy_new * overlong.buffer_length / overlong.max_response_length))
        _set(out, "algorithm.overlong.buffer_length", min(buffer, toy_new - 1))
    toy_prompt = min(cfg.data.max_prompt_len, TOY_MAX_PROMPT_LEN)
    _set(out, "data.max_prompt_len", toy_prompt)
    ratio = cfg.actor.micro_batch_tokens / (cfg.data.max_prompt_len + max_new)
    _set(out, "actor.micro_batch_tokens", max(1, math.ceil(ratio * (toy_prompt + toy_new))))
    # Machine: reward processes, and the rollout deployment the CPU demo uses.
    _set(out, "reward.num_workers", min(cfg.reward.num_workers, TOY_REWARD_WORKERS))
    for f in dataclasses.fields(cpu.rollout):
        if f.name not in ROLLOUT_RECIPE_KEYS:
            _set(out, f"rollout.{f.name}", copy.deepcopy(getattr(cpu.rollout, f.name)))
    _set(out, "rollout.server_urls", list(server_urls or []))
    _set(out, "rollout.router_url", None)
    if out.rollout.routing_replay:  # the routes do not pass through sglang-router
        _set(out, "rollout.use_router", False)
    revalidate(out)
    return out, procs


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            out.update(_flatten(getattr(value, f.name), f"{prefix}{f.name}."))
        return out
    return {prefix[:-1]: value}


def _render(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def config_changes(before, after) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (before, after)}`` for every leaf field that differs."""
    a, b = _flatten(before), _flatten(after)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def toy_overrides(cfg, **kwargs) -> tuple[list[str], int]:
    """:func:`shrink` as ``key=value`` overrides of the recipe (and the process count)."""
    small, procs = shrink(cfg, **kwargs)
    return [f"{k}={_render(v)}" for k, (_, v) in config_changes(cfg, small).items()], procs


# ----------------------------------------------------------------------------- model, data


def _chat_format(hf_config: dict) -> str:
    return "llama3" if hf_config.get("model_type") == "llama" else "deepseek_r1"


# Stand-ins for the recipes' models' chat formats (DeepSeek-R1-Distill's, Llama-3's).
_CHAT = {
    "deepseek_r1": dict(
        bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", extra=("<｜User｜>", "<｜Assistant｜>"),
        template=(
            "{{ bos_token }}{% for m in messages %}"
            "{% if m['role'] == 'system' %}{{ m['content'] }}"
            "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
            "{% else %}<｜Assistant｜>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"),
    ),
    "llama3": dict(
        bos="<|begin_of_text|>", eos="<|eot_id|>", extra=("<|start_header_id|>", "<|end_header_id|>"),
        template=(
            "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    ),
}


def make_toy_tokenizer(out_dir: str | None = None, chat_format: str = "deepseek_r1"):
    """A byte-level HF fast tokenizer with one token per printable ASCII character and newline
    (BPE without merges, GPT-2 byte alphabet, so the family's own tokenizer class — transformers
    rebuilds Qwen2's from the vocabulary — reads it the same), the chat format's special tokens and
    template, and one token per ``\\boxed{d}`` answer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chat = _CHAT[chat_format]
    pad, unk = "<pad>", "<unk>"
    specials = [pad, unk, chat["bos"], chat["eos"], *chat["extra"]]
    boxed = [f"\\boxed{{{a}}}" for a in BOXED_ANSWERS]
    byte_char = dict(zip(range(256), _bytes_to_unicode()))
    chars = [byte_char[b] for b in [*range(32, 127), ord("\n")]]
    vocab = {t: i for i, t in enumerate(specials + boxed + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in boxed])
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=chat["bos"],
                                        eos_token=chat["eos"], pad_token=pad, unk_token=unk)
    tokenizer.chat_template = chat["template"]
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (what ByteLevel pre-tokenizers map bytes to)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def toy_hf_config(hf_config: dict) -> dict:
    """``hf_config`` (a recipe's ``HF_CONFIG``) with toy sizes: every key but ``SIZE_KEYS`` (and
    an MoE's ``MOE_SIZE_KEYS``) kept. Grouped-query attention stays grouped (4 heads over 2 KV
    heads) unless the model has none; an MoE keeps 4 experts, top-2 (fewer if it has fewer)."""
    out = {k: v for k, v in hf_config.items() if k not in SIZE_KEYS + NUMERIC_KEYS + MOE_SIZE_KEYS}
    grouped = hf_config["num_attention_heads"] != hf_config.get("num_key_value_heads", hf_config["num_attention_heads"])
    out.update(hidden_size=TOY_HIDDEN, intermediate_size=TOY_FFN, num_attention_heads=TOY_HEADS,
               num_key_value_heads=TOY_KV_HEADS if grouped else TOY_HEADS,
               num_hidden_layers=TOY_LAYERS,
               max_position_embeddings=TOY_MAX_POSITIONS)
    if "num_experts" in hf_config:  # MoE: fewer, narrower experts; routing settings stay
        out.update(num_experts=min(hf_config["num_experts"], TOY_EXPERTS),
                   num_experts_per_tok=min(hf_config["num_experts_per_tok"], TOY_TOPK),
                   moe_intermediate_size=TOY_MOE_FFN)
    return out


def make_toy_model(out_dir: str, hf_config: dict, *, seed: int = 0) -> str:
    """Writes a random-init HF model of ``hf_config``'s family at toy size (config.json,
    model.safetensors) and its toy tokenizer into ``out_dir``; returns ``out_dir``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    fields = toy_hf_config(hf_config)
    tokenizer = make_toy_tokenizer(out_dir, _chat_format(hf_config))
    fields.pop("architectures", None)
    config = AutoConfig.for_model(
        fields.pop("model_type"), **fields, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dtype="float32")
    config.architectures = list(hf_config["architectures"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def make_toy_math_data(path: str, rows: int = 256, seed: int = 0) -> str:
    """JSONL math prompts ("What is a+b?") whose answers are 0..4 (one ``\\boxed{}`` token each)."""
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for _ in range(rows):
            total = rng.randint(0, len(BOXED_ANSWERS) - 1)
            a = rng.randint(0, total)
            f.write(json.dumps({"prompt": f"What is {a}+{total - a}?", "answer": str(total)}) + "\n")
    return path


DEFAULT_HF_CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", num_attention_heads=8, num_key_value_heads=2,
    max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, hidden_act="silu",
    tie_word_embeddings=False,
)
"""The toy model of a recipe that brings no model description of its own (``HF_CONFIG``), such
as ``small_cpu`` ("a small Hugging Face model"): a Llama, like the demo's."""


def toy_assets(recipe, cfg, out_dir: str) -> dict[str, str]:
    """``{"model": dir, "train": path}`` for the toy run of ``recipe`` (the module; ``cfg`` its
    TrainerConfig), made under ``out_dir`` once and shared by recipes with the same toy model.

    The data follow the recipe's reward: ``math`` gets :func:`make_toy_math_data` and a toy model
    of the recipe's ``HF_CONFIG``; ``synthetic`` (the demo's task) the demo's own model, tokenizer
    and data (``maspo-megatron demo``'s assets). Another reward needs its toy data added here.
    """
    import hashlib

    fn = cfg.reward.fn
    if fn == "synthetic":
        from maspo_megatron.demo import prepare_assets

        path = os.path.join(out_dir, "synthetic")
        if not os.path.isdir(os.path.join(path, "assets")):
            prepare_assets(path)
        return {"model": os.path.join(path, "assets", "model"),
                "train": os.path.join(path, "assets", "data", "train.jsonl")}
    if fn != "math":
        raise NotImplementedError(f"no toy data for reward {fn!r} (recipe {getattr(recipe, '__name__', recipe)}): "
                                  "add some to maspo_megatron/toy.py:toy_assets")
    hf = getattr(recipe, "HF_CONFIG", DEFAULT_HF_CONFIG)
    toy = toy_hf_config(hf)
    key = hashlib.sha256(json.dumps(toy, sort_keys=True).encode()).hexdigest()[:10]
    model_dir = os.path.join(out_dir, f"{toy['model_type']}-{key}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        make_toy_model(model_dir, hf)
    train = os.path.join(out_dir, "math", "train.jsonl")
    if not os.path.isfile(train):
        make_toy_math_data(train)
    return {"model": model_dir, "train": train}
