"""Small helpers on streams of named tensors, shared by checkpoint export and weight sync."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch


def bucket_named_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]],
                         bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Groups a stream of named tensors into lists of about ``bucket_bytes`` each.

    A bucket is closed before the tensor that would take it over the limit; a tensor larger
    than the limit travels alone. Order is preserved.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket
