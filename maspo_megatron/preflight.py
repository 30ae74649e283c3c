"""Pre-flight checks of ``maspo-megatron train``: what can be known before any process starts.

``cli.py`` runs :func:`run_preflight` in the parent process, before it starts torchrun (and on
every rank when the job is started under torchrun directly, as on Slurm). Each check raises
:class:`~maspo_megatron.config.ConfigError` with one line naming the key or the file; the CLI
prints it and exits 2, with no traceback and nothing started. In order:

- every config section's ``__post_init__`` (``config.revalidate``; ``apply_overrides`` runs it),
  which includes the sampling rules of ``TrainerConfig`` (one temperature, no top-p/top-k);
- ``model.path`` and ``data.train_path`` are set and exist; FP8 needs Transformer Engine;
- model files: ``config.json`` parses and names a supported architecture, and every safetensors
  file's header reads (a truncated or partial download is named);
- the layout against ``config.json``: ``parallel.tp`` divides the attention heads, key/value
  heads and MLP width, ``parallel.pp`` (times ``parallel.vpp``) the layers, and the process
  count fits ``tp*pp*cp``; with virtual pipeline stages, every data-parallel rank gets at least
  ``pp`` sequences per mini-batch (the interleaved schedule's micro-batch minimum);
- the rollout backend's own check of the model (e.g. ``rollout.sglang_tp`` against the heads);
- ``reward.fn`` resolves (a registered name or ``module:function``);
- the data: the first rows of ``data.train_path`` (and ``data.eval_path`` when evaluating)
  parse with the dataset's own parser, the file holds at least ``prompts_per_step`` prompts,
  and the tokenizer has a chat template when ``data.apply_chat_template``;
- the resume guard: a checkpoint in ``output_dir`` written for another model (path or
  architecture) or an incompatible config (the data and its order, the optimizer's parameter-
  group keys) stops the run naming both values; ``resume_force=true`` resumes anyway.

Reading only headers, the first rows and small JSON files keeps this to about a second beyond
the imports the recipe needs anyway.
"""

from __future__ import annotations

import json
import os
import types
from typing import Any

from maspo_megatron.config import ConfigError, to_dict

__all__ = ["FIRST_ROWS", "PREFLIGHT_DONE_ENV", "GUARDED_KEYS", "check_data", "check_layout",
           "check_model_files", "check_resume", "check_reward", "resume_differences", "run_preflight",
           "run_record"]

FIRST_ROWS = 32
"""Rows of each data file parsed before the run (the trainer parses them all on rank 0)."""

PREFLIGHT_DONE_ENV = "MASPO_MEGATRON_PREFLIGHT_DONE"
"""Set by the CLI for the torchrun it starts: the ranks skip the checks their parent made."""

ARCH_KEYS = ("architectures", "model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
             "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")
"""config.json fields a checkpoint records as its model's architecture (the resume guard)."""

GUARDED_KEYS = (
    # The data cursor resumes a position in this data and order (data/cursor.py).
    "data.train_path", "data.prompt_field", "data.answer_field", "data.prompt_template",
    "data.system_prompt", "data.apply_chat_template", "data.max_prompt_len", "data.shuffle", "data.seed",
    # megatron keys the optimizer's parameter groups by these: the saved state would not load.
    "actor.optimizer.lr", "actor.optimizer.min_lr", "actor.optimizer.weight_decay",
)
"""Config keys that must equal the checkpoint's for a resume (besides the model)."""

_PATH_KEYS = {"model.path", "data.train_path"}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def fail(message: str) -> ConfigError:
    return ConfigError(_one_line(message))


# ----------------------------------------------------------------------------- model files


def read_model_config(model_path: str) -> dict:
    """``model_path/config.json`` as a dict; ConfigError naming the file when absent or bad."""
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        raise fail(f"model.path={model_path!r} has no config.json (expected a Hugging Face model directory)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise fail(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise fail(f"{path} is not a JSON object")
    return config


def check_model_files(model_path: str) -> dict:
    """config.json (parsed, architecture supported) and every safetensors header; returns config.json."""
    from safetensors import safe_open

    from maspo_megatron.megatron.convert import SAFE_INDEX, SAFE_SINGLE
    from maspo_megatron.megatron.families import get_family

    config = read_model_config(model_path)
    try:
        get_family(types.SimpleNamespace(architectures=config.get("architectures")))
    except (ValueError, NotImplementedError) as e:
        raise fail(f"model.path={model_path!r}: {e}") from None
    index = os.path.join(model_path, SAFE_INDEX)
    weight_map: dict[str, str] = {}
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError("'weight_map' is empty or not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise fail(f"{index} is not a valid safetensors index ({type(e).__name__}: {e})") from None
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(model_path, SAFE_SINGLE)):
        files = [SAFE_SINGLE]
    else:
        raise fail(f"model.path={model_path!r} has neither {SAFE_SINGLE} nor {SAFE_INDEX} "
                   "(the trainer reads safetensors weights)")
    found: dict[str, str] = {}
    for name in files:
        path = os.path.join(model_path, name)
        if not os.path.isfile(path):
            raise fail(f"{index} lists {name}, which does not exist in {model_path}")
        try:
            with safe_open(path, framework="pt") as handle:
                found.update(dict.fromkeys(handle.keys(), name))
        except Exception as e:  # noqa: BLE001 - any unreadable header: name the file
            raise fail(f"{path}: the safetensors header cannot be read ({e}); a truncated or partial "
                       "download? Fetch the file again") from None
    for tensor, name in weight_map.items():
        if found.get(tensor) != name:
            raise fail(f"{index} puts tensor {tensor!r} in {name}, whose header does not hold it")
    return config


# ----------------------------------------------------------------------------- layout


def _divisors_fitting(counts: list[int], limit: int = 16) -> list[int]:
    return [d for d in range(1, limit + 1) if all(c % d == 0 for c in counts)]


def check_layout(cfg, hf_config: dict, nproc: int | None = None) -> None:
    """``parallel.tp``/``pp`` against the heads, key/value heads, MLP width and layers of
    config.json; ``nproc`` (processes to start) against ``tp*pp*cp``."""
    src = os.path.join(cfg.model.path, "config.json")
    for key in ("num_attention_heads", "num_hidden_layers"):
        if not isinstance(hf_config.get(key), int) or hf_config[key] < 1:
            raise fail(f"{src} has no positive integer {key} (got {hf_config.get(key)!r})")
    heads, layers = hf_config["num_attention_heads"], hf_config["num_hidden_layers"]
    kv = hf_config.get("num_key_value_heads") or heads
    ffn = hf_config.get("intermediate_size")
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    widths = [("num_attention_heads", heads), ("num_key_value_heads", kv)]
    if isinstance(ffn, int):
        widths.append(("intermediate_size", ffn))
    for name, count in widths:
        if count % tp:
            fits = _divisors_fitting([c for _, c in widths])
            raise fail(f"parallel.tp={tp} does not divide {name}={count} of {src} (megatron splits "
                       f"them over tensor-parallel ranks); tp values that fit: {fits}")
    if layers % pp:
        raise fail(f"parallel.pp={pp} does not divide num_hidden_layers={layers} of {src}; pp values "
                   f"that fit: {_divisors_fitting([layers], limit=layers)}")
    vpp = cfg.parallel.vpp
    if vpp and layers % (pp * vpp):
        fits = [v for v in range(1, layers // pp + 1) if layers % (pp * v) == 0]
        raise fail(f"parallel.pp * parallel.vpp = {pp}*{vpp} does not divide num_hidden_layers={layers} "
                   f"of {src} (each virtual pipeline stage holds as many layers); vpp values that fit "
                   f"at pp={pp}: {fits}")
    if nproc is not None:
        try:
            dp = cfg.parallel.validate(nproc)
        except ValueError as e:
            raise fail(f"{nproc} processes (--nproc-per-node, or the GPUs here): {e}") from None
        per_rank = cfg.prompts_per_step * cfg.rollout.n_samples // cfg.actor.num_mini_batches // dp
        if vpp and per_rank < pp:
            raise fail(f"parallel.vpp={vpp}: the interleaved schedule needs at least parallel.pp={pp} "
                       f"micro-batches, but each data-parallel rank gets {per_rank} sequences per "
                       f"mini-batch (prompts_per_step={cfg.prompts_per_step} x rollout.n_samples="
                       f"{cfg.rollout.n_samples} / actor.num_mini_batches={cfg.actor.num_mini_batches} "
                       f"/ {dp} data-parallel ranks); raise prompts_per_step or lower num_mini_batches")


def check_rollout_model(cfg, hf_config: dict) -> None:
    """The rollout backend's own check of the model it will serve (launched servers only)."""
    if cfg.rollout.server_urls:
        return  # attached servers already serve it
    from maspo_megatron.rollout.backend import get_backend

    try:
        get_backend(cfg.rollout.engine).check_model(cfg.rollout.server_spec(cfg.model.path), hf_config)
    except (ValueError, NotImplementedError) as e:
        raise fail(f"{e} ({os.path.join(cfg.model.path, 'config.json')})") from None


# ----------------------------------------------------------------------------- reward, data


def check_reward(cfg) -> None:
    """``reward.fn`` resolves to a function (and can reach worker processes when they score)."""
    import pickle

    from maspo_megatron.reward import get_reward

    try:
        fn = get_reward(cfg.reward.fn)
    except KeyError as e:
        raise fail(f"reward.fn={cfg.reward.fn!r}: {e.args[0]}") from None
    except Exception as e:  # noqa: BLE001 - the user's module raised while being imported
        raise fail(f"reward.fn={cfg.reward.fn!r}: importing it raised {type(e).__name__}: {e}") from None
    if cfg.reward.num_workers > 0:
        try:
            pickle.dumps(fn)
        except Exception as e:  # noqa: BLE001
            raise fail(f"reward.fn={cfg.reward.fn!r} cannot be sent to reward worker processes ({e}): it must "
                       "be a module-level function of an importable module (or set reward.num_workers=0)") from None


def _has_chat_template(model_path: str) -> bool:
    # Where transformers looks: tokenizer_config.json, chat_template.jinja/.json, additional_chat_templates/.
    if any(os.path.exists(os.path.join(model_path, name))
           for name in ("chat_template.jinja", "chat_template.json", "additional_chat_templates")):
        return True
    try:
        with open(os.path.join(model_path, "tokenizer_config.json")) as f:
            return bool(json.load(f).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def check_data(cfg) -> None:
    """The first rows of each data file through the dataset's parser; its size; chat template."""
    from maspo_megatron.data.dataset import DataError, count_rows, parse_row, read_rows

    files = [("data.train_path", cfg.data.train_path)]
    if cfg.eval_every and cfg.data.eval_path:
        files.append(("data.eval_path", cfg.data.eval_path))
    sizes = {}
    for key, path in files:
        if not os.path.isfile(path):
            raise fail(f"{key}={path!r} does not exist" + (" (it is a directory)" if os.path.isdir(path) else ""))
        try:
            for location, record in read_rows(path, limit=FIRST_ROWS):
                parse_row(record, cfg.data, f"{path}: {location}")
            sizes[key] = count_rows(path)
        except DataError as e:
            raise fail(f"{key}: {e}") from None
        except Exception as e:  # noqa: BLE001 - unreadable file (encoding, broken Parquet, ...)
            raise fail(f"{key}={path!r} cannot be read ({type(e).__name__}: {e})") from None
        if sizes[key] == 0:
            raise fail(f"{key}={path!r} has no rows")
    if sizes["data.train_path"] < cfg.prompts_per_step:
        raise fail(f"data.train_path={cfg.data.train_path!r} has {sizes['data.train_path']} prompts, fewer than "
                   f"prompts_per_step={cfg.prompts_per_step}: every step would train some prompts twice; "
                   "lower prompts_per_step or add prompts")
    if cfg.data.apply_chat_template and not _has_chat_template(cfg.model.path):
        raise fail(f"data.apply_chat_template=true, but the tokenizer in model.path={cfg.model.path!r} has no chat "
                   "template (none in tokenizer_config.json, no chat_template.jinja): set "
                   "data.apply_chat_template=false to send the prompts as raw text")


# ----------------------------------------------------------------------------- resume guard


def run_record(cfg, hf_config: dict | None = None) -> dict:
    """What a checkpoint records about the run that wrote it (``extra_state['run']``): the
    model's resolved path and architecture (config.json fields), and the whole config."""
    if hf_config is None:
        try:
            hf_config = read_model_config(cfg.model.path)
        except ConfigError:
            hf_config = {}
    return {"model_path": os.path.realpath(cfg.model.path),
            "architecture": {k: hf_config[k] for k in ARCH_KEYS if k in hf_config},
            "config": to_dict(cfg)}


def _lookup(tree: dict, key: str) -> Any:
    value: Any = tree
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


_MISSING = object()


def resume_differences(saved: dict, current: dict) -> list[str]:
    """What differs between two :func:`run_record` s, as ``key: X there, Y here`` lines."""
    out = []
    old_path = saved.get("model_path") or _lookup(saved.get("config") or {}, "model.path")
    if old_path not in (None, _MISSING) and os.path.realpath(old_path) != current["model_path"]:
        out.append(f"model.path: {old_path!r} there, {current['model_path']!r} here")
    old_arch, new_arch = saved.get("architecture") or {}, current.get("architecture") or {}
    for key in ARCH_KEYS:
        if key in old_arch and key in new_arch and old_arch[key] != new_arch[key]:
            out.append(f"the model's {key}: {old_arch[key]!r} there, {new_arch[key]!r} here")
    old_cfg, new_cfg = saved.get("config") or {}, current.get("config") or {}
    for key in GUARDED_KEYS:
        old, new = _lookup(old_cfg, key), _lookup(new_cfg, key)
        if old is _MISSING or new is _MISSING:
            continue
        same = (os.path.realpath(old) == os.path.realpath(new)) if key in _PATH_KEYS and old and new else old == new
        if not same:
            out.append(f"{key}: {old!r} there, {new!r} here")
    return out


def check_resume(cfg, hf_config: dict | None = None) -> list[str]:
    """The resume guard. Returns notes to print (a corrupt checkpoint passed over, a forced
    resume); raises when the checkpoint the run would resume from belongs to another run."""
    from maspo_megatron.megatron.checkpoint import (
        CheckpointError,
        find_checkpoint,
        has_checkpoint,
        iteration_dir,
        read_trainer_state,
    )

    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    if not cfg.resume or not has_checkpoint(ckpt_dir):
        return []
    choice = find_checkpoint(ckpt_dir)
    if choice.step is None:
        raise fail(f"output_dir={cfg.output_dir!r} holds checkpoints, but none is complete ({'; '.join(choice.skipped)}): "
                   "set resume=false to start over there, or use another output_dir")
    notes = [f"{reason}; the run resumes from step {choice.step}, the newest complete checkpoint"
             for reason in choice.skipped]
    try:
        record = (read_trainer_state(iteration_dir(ckpt_dir, choice.step)).get("extra_state") or {}).get("run")
    except CheckpointError:
        record = None
    if record is None:  # written before checkpoints recorded their run: the run's config.json
        try:
            with open(os.path.join(cfg.output_dir, "config.json")) as f:
                record = {"config": json.load(f)}
        except (OSError, ValueError):
            return notes
    diffs = resume_differences(record, run_record(cfg, hf_config))
    if not diffs:
        return notes
    text = "; ".join(diffs)
    if cfg.resume_force:
        return notes + [f"resume_force=true: resuming from step {choice.step} of {ckpt_dir} although {text}"]
    raise fail(f"output_dir={cfg.output_dir!r} holds a checkpoint (step {choice.step}) of another run: {text}. "
               "Use another output_dir, set resume=false to start over there (its checkpoints and metrics "
               "are replaced), or resume_force=true to resume from it anyway")


# ----------------------------------------------------------------------------- all of them


def run_preflight(cfg, *, nproc: int | None = None, recipe: str | None = None) -> list[str]:
    """Every check above, in order; returns notes for the console, raises ConfigError (one line)."""
    for key, path in (("model.path", cfg.model.path), ("data.train_path", cfg.data.train_path)):
        if not path:
            raise fail(f"{key} must be set" + (f" (recipe {recipe!r} leaves it empty)" if recipe else ""))
        if not os.path.exists(path):
            raise fail(f"{key}={path!r} does not exist")
    if not os.path.isdir(cfg.model.path):
        raise fail(f"model.path={cfg.model.path!r} is not a directory (expected a Hugging Face model directory)")
    if cfg.model.fp8:
        from maspo_megatron.megatron.model import te_available

        if not te_available():
            raise fail(f"model.fp8={cfg.model.fp8!r} needs Transformer Engine on a CUDA device, which this "
                       "machine lacks (use the NGC PyTorch/NeMo container, or set model.fp8=none)")
    hf_config = check_model_files(cfg.model.path)
    check_layout(cfg, hf_config, nproc)
    check_rollout_model(cfg, hf_config)
    check_reward(cfg)
    check_data(cfg)
    return check_resume(cfg, hf_config)
