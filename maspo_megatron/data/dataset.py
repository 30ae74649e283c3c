"""Prompt datasets from local JSONL / Parquet files, rendered with the model's chat template.

A row gives a prompt and a reference answer (field names configurable; dotted names reach into
nested records, e.g. ``reward_model.ground_truth`` in verl-style Parquet). The prompt is either a
string — put into ``DataConfig.prompt_template`` and sent as one user message — or a list of chat
messages (``{"role": ..., "content": ...}``), used as is. Prompts are tokenized once at load time;
those longer than ``max_prompt_len`` tokens are dropped and reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

__all__ = ["DataConfig", "DataError", "PromptSample", "PromptDataset", "count_rows", "load_tokenizer", "parse_row",
           "read_rows"]

logger = logging.getLogger(__name__)

PROMPT_PLACEHOLDER = "{prompt}"


class DataError(ValueError):
    """A dataset row (or file) does not have the expected shape; the message says where and why."""


@dataclass
class DataConfig:
    """Where prompts come from and how they become token ids.

    train_path:          .jsonl (one JSON object per line) or .parquet file of training prompts.
    eval_path:           same format, for periodic evaluation; None disables evaluation data.
    prompt_field:        row field holding the prompt (string or list of chat messages); dotted
                         names reach into nested records ("extra_info.question").
    answer_field:        row field holding the reference answer (string or number).
    prompt_template:     text around a string prompt; "{prompt}" is replaced by the row's prompt
                         (plain substitution, not str.format, so LaTeX braces need no escaping).
                         E.g. "{prompt}\\nPlease reason step by step, and put your final answer
                         within \\boxed{}." Not applied to chat-message prompts.
    system_prompt:       optional system message placed before the user message (chat template only).
    apply_chat_template: render through the tokenizer's chat template with the generation prompt
                         appended; False sends the templated prompt text as raw text (the
                         tokenizer's own special tokens, e.g. BOS, are still added).
    max_prompt_len:      prompts with more tokens than this are dropped at load time (and reported).
    shuffle:             reshuffle the training prompts every epoch.
    seed:                base seed of the per-epoch shuffles.
    """

    train_path: str = ""
    eval_path: str | None = None
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    prompt_template: str = PROMPT_PLACEHOLDER
    system_prompt: str | None = None
    apply_chat_template: bool = True
    max_prompt_len: int = 1024
    shuffle: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if PROMPT_PLACEHOLDER not in self.prompt_template:
            raise ValueError(f"data.prompt_template must contain {PROMPT_PLACEHOLDER!r}, got {self.prompt_template!r}")
        if self.max_prompt_len <= 0:
            raise ValueError(f"data.max_prompt_len must be > 0, got {self.max_prompt_len}")
        if self.system_prompt is not None and not self.apply_chat_template:
            raise ValueError("data.system_prompt needs data.apply_chat_template=True (raw prompts have no roles)")


@dataclass(frozen=True)
class PromptSample:
    """One prompt ready for rollout.

    index:      position in the (filtered) dataset; what the data cursor counts.
    source:     "<file>:<line N | row N>", for messages about this prompt.
    prompt_ids: token ids sent to the rollout engine.
    prompt:     the rendered prompt text (after template / chat template).
    answer:     the reference answer, as a string, for the reward function.
    """

    index: int
    source: str
    prompt_ids: tuple[int, ...]
    prompt: str
    answer: str


def load_tokenizer(model_dir: str):
    """The HF tokenizer stored in ``model_dir`` (tokenizer.json / tokenizer_config.json)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist (expected an HF model/tokenizer directory)")
    return AutoTokenizer.from_pretrained(model_dir)


def read_rows(path: str, limit: int | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location, record) for each row: location is "line N" (1-based) for JSONL, "row N"
    (0-based row index) for Parquet. Blank JSONL lines are skipped. ``limit``: only the first
    rows (a Parquet file is then read batch by batch, not whole)."""
    if limit is not None:
        rows = read_rows(path) if not path.lower().endswith(".parquet") else _first_parquet_rows(path, limit)
        for count, row in enumerate(rows):
            if count >= limit:
                return
            yield row
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file {path!r} does not exist")
    suffix = path.lower()
    if suffix.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {line_no}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}: line {line_no}: expected a JSON object, got {type(record).__name__}")
                yield f"line {line_no}", record
    elif suffix.endswith(".parquet"):
        import pyarrow.parquet as pq

        for row_index, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"row {row_index}", record
    else:
        raise DataError(f"{path}: unsupported dataset format; expected a .jsonl (or .json lines) or .parquet file")


def _first_parquet_rows(path: str, limit: int) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file {path!r} does not exist")
    row_index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=max(1, limit)):
        for record in batch.to_pylist():
            yield f"row {row_index}", record
            row_index += 1
            if row_index >= limit:
                return


def count_rows(path: str) -> int:
    """Rows in a dataset file without parsing them: non-blank JSONL lines, or the Parquet
    footer's row count."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file {path!r} does not exist")
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def parse_row(record: dict[str, Any], config: DataConfig, where: str) -> tuple[list[dict[str, str]] | str, str]:
    """One row's (prompt, answer): chat messages (or raw text) and the answer as a string.

    Raises:
        DataError: a field is missing or has the wrong shape; the message starts with ``where``.
    """
    prompt = _messages_from(_get_field(record, config.prompt_field, where), config, where)
    return prompt, _answer_from(_get_field(record, config.answer_field, where), config, where)


def _get_field(record: dict[str, Any], field: str, where: str) -> Any:
    if field in record:
        return record[field]
    value: Any = record
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DataError(f"{where}: field {field!r} is missing (row has fields {sorted(record)})")
        value = value[part]
    return value


def _messages_from(value: Any, config: DataConfig, where: str) -> list[dict[str, str]] | str:
    """The prompt as chat messages (chat-template mode) or as text (raw mode)."""
    field = config.prompt_field
    if isinstance(value, str):
        text = config.prompt_template.replace(PROMPT_PLACEHOLDER, value)
        if not config.apply_chat_template:
            return text
        messages = [{"role": "user", "content": text}]
        if config.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": config.system_prompt})
        return messages
    if isinstance(value, list) and value:
        for i, message in enumerate(value):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise DataError(
                    f"{where}: field {field!r}: message {i} must be an object with string 'role' and "
                    f"'content', got {message!r:.200}"
                )
        if not config.apply_chat_template:
            raise DataError(f"{where}: field {field!r} is a list of chat messages, which needs data.apply_chat_template=True")
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
        if config.system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": config.system_prompt})
        return messages
    raise DataError(
        f"{where}: field {field!r}: expected a string or a non-empty list of chat messages, got {type(value).__name__} {value!r:.200}"
    )


def _answer_from(value: Any, config: DataConfig, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: field {config.answer_field!r}: expected a string or a number, got {type(value).__name__} {value!r:.200}")


class PromptDataset:
    """The prompts of one file, tokenized and length-filtered, indexable like a list.

    Attributes beyond the samples: ``num_rows`` (rows read), ``dropped`` (the (source, length) of
    every prompt over ``max_prompt_len``), ``fingerprint`` (a hash of the kept samples, which the
    data cursor checks on resume).
    """

    def __init__(self, path: str, config: DataConfig, tokenizer):
        self.path = path
        self.config = config
        if config.apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                "set data.apply_chat_template=False to send raw prompts"
            )
        sources, texts, answers = [], [], []
        for location, record in read_rows(path):
            prompt, answer = parse_row(record, config, f"{path}: {location}")
            answers.append(answer)
            if isinstance(prompt, list):
                prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            sources.append(f"{path}:{location}")
            texts.append(prompt)
        self.num_rows = len(texts)
        if not texts:
            raise DataError(f"{path}: the file has no rows")
        # A rendered chat template already holds its special tokens (BOS etc.): don't add them twice.
        token_ids = tokenizer(texts, add_special_tokens=not config.apply_chat_template)["input_ids"]

        self.samples: list[PromptSample] = []
        self.dropped: list[tuple[str, int]] = []
        for source, text, answer, ids in zip(sources, texts, answers, token_ids):
            if len(ids) > config.max_prompt_len:
                self.dropped.append((source, len(ids)))
                continue
            self.samples.append(PromptSample(len(self.samples), source, tuple(ids), text, answer))
        if self.dropped:
            logger.warning(
                "%s: dropped %d of %d prompts longer than max_prompt_len=%d tokens (longest %d)",
                path, len(self.dropped), self.num_rows, config.max_prompt_len, max(n for _, n in self.dropped),
            )
        if not self.samples:
            raise DataError(f"{path}: all {self.num_rows} prompts are longer than max_prompt_len={config.max_prompt_len}")
        digest = hashlib.sha256()
        for sample in self.samples:
            digest.update(json.dumps([sample.prompt_ids, sample.answer]).encode())
        self.fingerprint = digest.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> PromptSample:
        return self.samples[index]

    def __iter__(self) -> Iterator[PromptSample]:
        return iter(self.samples)
