"""Metrics that carry their own weight, so their reduction over micro-batches and ranks is exact.

A loss or objective computes each metric over *its* elements of one call (one micro-batch on one
rank): the tokens of one advantage sign, the sequences, all response tokens... A mean over
several calls must weight each call by the number of elements it averaged over, not by the
call's token count. So every metric is a :class:`Metric` ``(total, weight)``:

- a mean: ``total`` = the sum over its elements, ``weight`` = their number; the mean over any
  split is ``sum(total) / sum(weight)`` (0 when no call had an element);
- a key ending in ``_max``: ``total`` = the maximum (0 when empty), ``weight`` = the number of
  elements; reduced with MAX.

Both are detached 0-dim float32 tensors (no host sync while computing them).
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import torch


class Metric(NamedTuple):
    total: torch.Tensor
    """Sum over the elements (a mean metric) or their maximum (a ``*_max`` key)."""
    weight: torch.Tensor
    """Number of elements the metric is over."""


Metrics = dict[str, Metric]


def is_max_metric(key: str) -> bool:
    """Keys ending in ``_max`` are maxima (reduced with MAX); every other key is a mean."""
    return key.endswith("_max")


def mean_metric(x: torch.Tensor, mask: torch.Tensor) -> Metric:
    """``x`` over ``mask`` as (sum, count); masked-out values (even inf/nan) never leak in."""
    x = x.detach().float()
    mask = mask.to(torch.bool)
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    return Metric(total, mask.sum().float())


def max_metric(x: torch.Tensor, mask: torch.Tensor) -> Metric:
    """Maximum of ``x`` over ``mask`` (0 when empty) and the count."""
    mask = mask.to(torch.bool)
    top = x.detach().float().masked_fill(~mask, float("-inf")).amax()
    return Metric(torch.where(torch.isfinite(top), top, torch.zeros_like(top)), mask.sum().float())


def combine(parts: Iterable[Metrics]) -> Metrics:
    """The metrics of several calls as those of one (sum of totals and weights; MAX for maxima)."""
    out: Metrics = {}
    for metrics in parts:
        for key, m in metrics.items():
            if key not in out:
                out[key] = Metric(m.total.float(), m.weight.float())
                continue
            total, weight = out[key]
            total = torch.maximum(total, m.total) if is_max_metric(key) else total + m.total
            out[key] = Metric(total, weight + m.weight)
    return out


def metric_value(key: str, total: float, weight: float) -> float:
    """The reported value of a (reduced) metric: the maximum, or total / weight (0 if empty)."""
    if is_max_metric(key):
        return float(total)
    return float(total) / float(weight) if weight > 0 else 0.0


def metric_values(metrics: Metrics) -> dict[str, float]:
    """Reported values of ``metrics`` (see :func:`metric_value`)."""
    return {k: metric_value(k, float(m.total), float(m.weight)) for k, m in metrics.items()}
