"""Prompt data: datasets from JSONL/Parquet, chat templates, a resumable cursor, the demo task."""

from .cursor import PromptLoader
from .dataset import DataConfig, DataError, PromptDataset, PromptSample, load_tokenizer, read_rows
from .synthetic import SyntheticTaskConfig, make_demo_model, make_demo_tokenizer, make_synthetic_dataset

__all__ = [
    "DataConfig",
    "DataError",
    "PromptDataset",
    "PromptLoader",
    "PromptSample",
    "SyntheticTaskConfig",
    "load_tokenizer",
    "make_demo_model",
    "make_demo_tokenizer",
    "make_synthetic_dataset",
    "read_rows",
]
