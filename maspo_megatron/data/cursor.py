"""A resumable cursor over a prompt dataset: epochs, per-epoch shuffles, exact resume.

The cursor is (epoch, index): the next prompt is ``order(epoch)[index]``, where ``order(epoch)``
is a permutation drawn from ``numpy.random.default_rng([seed, epoch])`` (the identity when not
shuffling). Every prompt is handed out once per epoch; a cursor restored from ``state_dict()``
continues with exactly the prompts not yet handed out — none repeated, none skipped — because the
order of every epoch is a pure function of (seed, epoch).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from .dataset import PromptDataset, PromptSample

__all__ = ["PromptLoader"]

_STATE_VERSION = 1


class PromptLoader:
    """Hands out prompts of ``dataset`` in per-epoch shuffled order, forever, resumably."""

    def __init__(self, dataset: PromptDataset, shuffle: bool = True, seed: int = 0):
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.index = 0  # prompts of the current epoch already handed out
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = len(self.dataset)
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self, size: int) -> list[PromptSample]:
        """The next ``size`` prompts, running into the next epoch when this one ends."""
        if size < 0:
            raise ValueError(f"batch size must be >= 0, got {size}")
        batch = []
        while len(batch) < size:
            order = self._epoch_order()
            take = min(size - len(batch), len(order) - self.index)
            batch.extend(self.dataset[int(i)] for i in order[self.index : self.index + take])
            self.index += take
            if self.index == len(order):
                self.epoch += 1
                self.index = 0
        return batch

    def __iter__(self) -> Iterator[PromptSample]:
        while True:
            yield self.next_batch(1)[0]

    @property
    def consumed(self) -> int:
        """Prompts handed out since the start of training."""
        return self.epoch * len(self.dataset) + self.index

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dataset_size": len(self.dataset),
            "fingerprint": self.dataset.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a cursor saved by ``state_dict()``; refuses one saved for other data or order."""
        missing = {"version", "epoch", "index", "seed", "shuffle", "dataset_size", "fingerprint"} - set(state)
        if missing:
            raise ValueError(f"data cursor state lacks keys {sorted(missing)}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"data cursor state version {state['version']} is not supported (expected {_STATE_VERSION})")
        if state["dataset_size"] != len(self.dataset) or state["fingerprint"] != self.dataset.fingerprint:
            raise ValueError(
                f"data cursor was saved for a different dataset ({state['dataset_size']} prompts, fingerprint "
                f"{state['fingerprint']}) than {self.dataset.path!r} ({len(self.dataset)} prompts, fingerprint "
                f"{self.dataset.fingerprint}): the file, prompt template, tokenizer or max_prompt_len changed, "
                "so resuming would repeat or skip prompts"
            )
        if (state["seed"], state["shuffle"]) != (self.seed, self.shuffle):
            raise ValueError(
                f"data cursor was saved with seed={state['seed']}, shuffle={state['shuffle']}; this loader has "
                f"seed={self.seed}, shuffle={self.shuffle}: the prompt order would differ"
            )
        if not 0 <= state["index"] < len(self.dataset) or state["epoch"] < 0:
            raise ValueError(f"data cursor position epoch={state['epoch']}, index={state['index']} is out of range")
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
