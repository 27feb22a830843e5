"""Padding-free packing: tokenized examples -> rows of at most ``max_length`` tokens.

Examples are taken in order and placed greedily: each goes into the current row if it fits, else
the row is closed and a new one starts (examples longer than ``max_length`` are cut). A row keeps
where its sequences start through ``position_ids``, which restart at 0 for every sequence. With
no ``attention_mask``, transformers (and slipstream's attention) read those restarts as sequence
boundaries and keep each sequence's attention inside itself.

The label of each sequence's first token is set to ``-100``: labels are unshifted, so that label
is what the *previous* sequence's last token would be trained to predict. No sequence is ever
trained to predict across its boundary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from slipstream.train.data import IGNORE_INDEX


def pack(examples: Sequence[dict], max_length: int) -> list[dict[str, list[int]]]:
    """Greedy next-fit packing; returns rows with ``input_ids``, ``labels``, ``position_ids`` lists."""
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    rows: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        ids = list(example["input_ids"])[:max_length]
        labels = list(example.get("labels") or ids)[:max_length]
        if not ids:
            continue
        if current["input_ids"] and len(current["input_ids"]) + len(ids) > max_length:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += ids
        current["labels"] += [IGNORE_INDEX, *labels[1:]]
        current["position_ids"] += list(range(len(ids)))
    if current["input_ids"]:
        rows.append(current)
    return rows


def sequence_starts(position_ids: Sequence[int]) -> list[int]:
    """Indices where a packed row's sequences begin (position 0)."""
    return [i for i, p in enumerate(position_ids) if p == 0]


class PackedCollator:
    """Packed rows -> a batch: ``input_ids``, ``labels``, ``position_ids`` and no attention mask.

    Rows shorter than the batch's longest are filled with one more "sequence" of ``pad_id``
    tokens (positions from 0, labels ``-100``): it sits after every real token, so causal
    attention never lets a real token see it, and it trains nothing.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.arange(width, dtype=torch.long).repeat(len(rows), 1)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.tensor(r["labels"], dtype=torch.long)
            positions[i, :n] = torch.tensor(r["position_ids"], dtype=torch.long)
            positions[i, n:] = torch.arange(width - n, dtype=torch.long)
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


__all__ = ["PackedCollator", "pack", "sequence_starts"]
