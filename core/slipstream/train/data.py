"""Examples in, token rows out: loading, chat-template rendering, completion-only labels, collation.

Records come from a JSONL file, a folder of JSONL files, a folder written by ``datasets``'
``save_to_disk``, ``builtin:stdlib-qa`` (the dataset shipped with slipstream), or any list of dicts.
Formats (``"auto"`` picks by the keys of the first record):

- ``chat``: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}``
- ``instruction``: ``{"instruction": ..., "input": ... (optional), "output": ...}``, rendered as a
  user turn (instruction, a blank line, input) and an assistant turn (output)
- ``text``: ``{"text": ...}``, trained on whole
- ``tokens``: already tokenized, ``{"input_ids": [...], "labels": [...] (optional)}``

Chat and instruction records are rendered with the tokenizer's chat template. With
``completion_only`` the labels of every token outside the assistant turns are ``-100``, so the
loss covers the completions only. Labels are *unshifted* (``labels[t] == input_ids[t]`` where
trained): the model shifts them, as transformers' causal-LM loss does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100
BUILTIN_DATA = {"stdlib-qa": "stdlib_qa.jsonl"}
FORMATS = ("instruction", "chat", "text", "tokens")


def data_dir() -> Path:
    """The folder of files shipped with slipstream (dataset, quickstart model config, tokenizer)."""
    return Path(__file__).resolve().parent.parent / "data"


def resolve_builtin(path: str, table: dict[str, str], what: str) -> Path | None:
    if not path.startswith("builtin:"):
        return None
    name = path.removeprefix("builtin:")
    if name not in table:
        raise ValueError(f"unknown built-in {what} {path!r}; built-in {what}s: "
                         f"{', '.join('builtin:' + k for k in table)}")
    return data_dir() / table[name]


# ----------------------------------------------------------------------------- loading
def load_records(source: str | Path | Sequence[dict] | Any, *, split: str = "train",
                 max_examples: int | None = None) -> list[dict]:
    """Read examples from ``source`` (see the module docstring); returns plain dicts."""
    if isinstance(source, (str, Path)):
        records = _load_path(str(source), split)
    elif hasattr(source, "to_list"):  # a datasets.Dataset
        records = source.to_list()
    else:
        records = [dict(r) for r in source]
    if not records:
        raise ValueError(f"no examples found in {source!r}")
    return records[:max_examples] if max_examples else records


def _load_path(path: str, split: str) -> list[dict]:
    builtin = resolve_builtin(path, BUILTIN_DATA, "dataset")
    p = builtin or Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"dataset {path!r} not found (looked for {p.resolve()}); give a JSONL "
                                f"file, a folder of JSONL files, a datasets.save_to_disk folder, or "
                                f"builtin:stdlib-qa")
    if p.is_file():
        return _read_jsonl(p)
    if any((p / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        try:
            from datasets import DatasetDict, load_from_disk
        except ImportError as exc:
            raise ImportError(f"{p} is a `datasets` folder; reading it needs the datasets package "
                              f"(pip install datasets)") from exc
        ds = load_from_disk(str(p))
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise ValueError(f"{p} has splits {', '.join(ds)}; set [data] split to one of them")
            ds = ds[split]
        return ds.to_list()
    files = sorted(p.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{p} is a folder without *.jsonl files or a datasets save_to_disk layout")
    return [r for f in files for r in _read_jsonl(f)]


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    return out


# ----------------------------------------------------------------------------- formatting
def detect_format(record: dict) -> str:
    if "input_ids" in record:
        return "tokens"
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "instruction"
    if "text" in record:
        return "text"
    raise ValueError(f"cannot tell the format of a record with keys {sorted(record)}; expected `messages` "
                     f"(chat), `instruction`+`output`, `text`, or `input_ids`")


def to_messages(record: dict, fmt: str) -> list[dict]:
    if fmt == "chat":
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError("a chat record's `messages` must be a list of {role, content} dicts")
        return [{"role": m["role"], "content": m.get("content", "")} for m in messages]
    if fmt == "instruction":
        prompt = str(record["instruction"])
        extra = record.get("input") or ""
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": str(record["output"])}]
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": str(record["system"])})
        return messages
    raise ValueError(f"format {fmt!r} has no messages")


def render_chat(messages: list[dict], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The chat-template text of ``messages`` and the character spans of the assistant turns.

    A span runs from the end of the template's rendering of the conversation up to that turn
    (with the generation prompt) to the end of its rendering including the turn: exactly the
    text the model is asked to produce. Templates must render conversations prefix-stably
    (turn ``k``'s text does not change when turn ``k+1`` is added), as chat templates do.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; set one (tokenizer.chat_template = ...) or use "
                         "`text` records")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = ""
        if i:
            before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise ValueError("the chat template does not render conversations prefix-stably, so the "
                             "assistant turns cannot be located; use completion_only = false")
        spans.append((len(before), len(upto)))
    return full, spans


def tokenize_record(record: dict, tokenizer: Any, *, fmt: str = "auto", completion_only: bool = True,
                    max_length: int | None = None) -> dict[str, list[int]]:
    """One record -> ``{"input_ids", "labels"}`` (lists; ``labels`` -100 where not trained)."""
    fmt = detect_format(record) if fmt == "auto" else fmt
    if fmt == "tokens":
        ids = list(record["input_ids"])
        labels = list(record.get("labels") or ids)
    elif fmt == "text":
        ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = [*ids, tokenizer.eos_token_id]
        labels = list(ids)
    else:
        text, spans = render_chat(to_messages(record, fmt), tokenizer)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=completion_only)
        ids = enc["input_ids"]
        if completion_only:
            labels = [tok if any(a <= start < b for a, b in spans) else IGNORE_INDEX
                      for tok, (start, _end) in zip(ids, enc["offset_mapping"], strict=True)]
        else:
            labels = list(ids)
    if len(labels) != len(ids):
        raise ValueError(f"a record has {len(ids)} input_ids but {len(labels)} labels")
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


@dataclass
class TokenStats:
    examples: int
    tokens: int
    trained_tokens: int
    truncated: int
    dropped: int

    def describe(self) -> str:
        return (f"{self.examples} examples, {self.tokens} tokens ({self.trained_tokens} trained), "
                f"{self.truncated} truncated, {self.dropped} dropped (nothing to train on)")


def tokenize_records(records: Iterable[dict], tokenizer: Any, *, fmt: str = "auto",
                     completion_only: bool = True,
                     max_length: int | None = None) -> tuple[list[dict], TokenStats]:
    """Tokenize every record; drops those with no trained token left (after truncation)."""
    out, truncated, dropped = [], 0, 0
    for record in records:
        full = tokenize_record(record, tokenizer, fmt=fmt, completion_only=completion_only)
        if max_length is not None and len(full["input_ids"]) > max_length:
            truncated += 1
            full = {k: v[:max_length] for k, v in full.items()}
        if not any(label != IGNORE_INDEX for label in full["labels"][1:]):
            dropped += 1
            continue
        out.append(full)
    tokens = sum(len(e["input_ids"]) for e in out)
    trained = sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in out)
    return out, TokenStats(len(out), tokens, trained, truncated, dropped)


# ----------------------------------------------------------------------------- collation
class Collator:
    """Unpacked examples -> a right-padded batch with ``attention_mask`` (and ``position_ids``).

    Padding gets ``pad_id`` inputs, ``-100`` labels and mask 0. Examples are cut to ``max_length``.
    """

    def __init__(self, pad_id: int, max_length: int | None = None) -> None:
        self.pad_id = pad_id
        self.max_length = max_length

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        rows = [{k: list(e[k])[: self.max_length] for k in ("input_ids", "labels")} for e in examples]
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.tensor(r["labels"], dtype=torch.long)
            mask[i, :n] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": positions}


def pad_token_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def trained_tokens(labels: torch.Tensor) -> int:
    """Number of tokens a batch's (unshifted) labels train: targets are ``labels[:, 1:]``."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


__all__ = ["FORMATS", "IGNORE_INDEX", "Collator", "TokenStats", "data_dir", "detect_format", "load_records",
           "pad_token_id", "render_chat", "to_messages", "tokenize_record", "tokenize_records",
           "trained_tokens"]
