"""Prompt data: datasets from JSONL/Parquet, chat templates, a resumable cursor, the demo task."""

from .cursor import PromptLoader
from .dataset import DataConfig, DataError, PromptDataset, PromptSample, load_tokenizer, read_rows

__all__ = ["DataConfig", "DataError", "PromptDataset", "PromptLoader", "PromptSample", "load_tokenizer", "read_rows"]
