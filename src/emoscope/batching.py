"""Left-padded batches with correct attention masks and position ids.

Batched results must equal one-at-a-time results, so every batch carries position ids that
start at 0 on each row's first real token, whatever its padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(dim=1)

    @property
    def padding(self) -> torch.Tensor:
        """Left-pad count per row: row ``r``'s token ``j`` sits at column ``padding[r] + j``."""
        return self.width - self.lengths

    def rows(self) -> list[list[int]]:
        """Each row's real token ids, padding removed."""
        ids, keep = self.input_ids.tolist(), self.attention_mask.bool().tolist()
        return [[t for t, k in zip(row, mask) if k] for row, mask in zip(ids, keep)]

    def inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def padding_id(tokenizer: Any) -> int:
    """The id that fills padding: the pad token, else EOS, else UNK, else 0 (it is masked out)."""
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def encode(
    tokenizer: Any,
    texts: Sequence[str],
    device: torch.device | str = "cpu",
    add_special_tokens: bool = True,
    max_length: int | None = None,
) -> Batch:
    """Tokenise ``texts`` into one left-padded batch.

    The padding is done here rather than by the tokenizer, so the caller's tokenizer is used as
    it is (its ``padding_side`` and pad token are never changed) and one without a pad token
    works too.
    """
    ids = tokenizer(
        list(texts),
        add_special_tokens=add_special_tokens,
        truncation=max_length is not None,
        max_length=max_length,
    )["input_ids"]
    return from_token_lists(ids, padding_id(tokenizer), device)


def from_token_lists(
    token_lists: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> Batch:
    """A left-padded batch from already-tokenised rows."""
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        if tokens:
            ids[row, width - len(tokens) :] = torch.tensor(list(tokens), dtype=torch.long)
            mask[row, width - len(tokens) :] = 1
    mask = mask.to(device)
    return Batch(ids.to(device), mask, position_ids(mask))


def length_sorted_batches(
    lengths: Sequence[int], max_batch: int, max_tokens: int | None = None
) -> list[list[int]]:
    """Group item indices by similar length so padding wastes little compute."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = max([lengths[j] for j in current] + [lengths[i]])
        if current and (
            len(current) >= max_batch
            or (max_tokens is not None and width * (len(current) + 1) > max_tokens)
        ):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
