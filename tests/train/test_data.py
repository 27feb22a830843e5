"""Data: formats, chat-template rendering, completion-only labels, packing, collation, loading."""

from __future__ import annotations

import json
import random

import pytest
import torch

from slipstream.train.data import (
    IGNORE_INDEX,
    Collator,
    detect_format,
    load_records,
    tokenize_record,
    tokenize_records,
    trained_tokens,
)
from slipstream.train.packing import PackedCollator, pack, sequence_starts


def trained_text(tok, enc) -> str:
    return tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab != IGNORE_INDEX])


def test_builtin_dataset_is_real_and_small():
    from slipstream.train.data import data_dir

    path = data_dir() / "stdlib_qa.jsonl"
    assert path.stat().st_size < 2_000_000
    records = load_records("builtin:stdlib-qa")
    assert len(records) >= 2000
    assert all(detect_format(r) == "instruction" for r in records[:50])
    assert any("json.dumps" in r["instruction"] + r["input"] for r in records)


def test_instruction_completion_only_trains_exactly_the_answer(tokenizer):
    record = {"instruction": "What does `json.dumps` do?", "input": "", "output": "Serialize obj to a JSON string."}
    enc = tokenize_record(record, tokenizer, completion_only=True)
    assert len(enc["input_ids"]) == len(enc["labels"])
    assert trained_text(tokenizer, enc) == "Serialize obj to a JSON string.<|end|>\n"
    prompt = tokenizer.decode(enc["input_ids"])
    assert prompt.startswith("<s><|user|>\nWhat does `json.dumps` do?<|end|>\n<|assistant|>\n")
    full = tokenize_record(record, tokenizer, completion_only=False)
    assert full["input_ids"] == enc["input_ids"] and full["labels"] == full["input_ids"]


def test_instruction_input_joined_with_blank_line(tokenizer):
    enc = tokenize_record({"instruction": "Explain.", "input": "os.path.join", "output": "Join paths."}, tokenizer)
    assert "Explain.\n\nos.path.join" in tokenizer.decode(enc["input_ids"])


def test_chat_masks_every_assistant_turn_and_only_those(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."}]
    enc = tokenize_record({"messages": messages}, tokenizer, completion_only=True)
    assert trained_text(tokenizer, enc) == "Hello there.<|end|>\nGoodbye.<|end|>\n"
    ids = enc["input_ids"]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_text_and_tokens_formats(tokenizer):
    enc = tokenize_record({"text": "plain text"}, tokenizer)
    assert enc["labels"] == enc["input_ids"] and enc["input_ids"][-1] == tokenizer.eos_token_id
    enc = tokenize_record({"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, tokenizer)
    assert enc == {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    with pytest.raises(ValueError, match="cannot tell the format"):
        detect_format({"prompt": "x"})


def test_truncation_and_dropping(tokenizer):
    long = {"instruction": "q " * 50, "input": "", "output": "answer"}
    out, stats = tokenize_records([long, {"instruction": "a", "input": "", "output": "b"}], tokenizer,
                                  max_length=20)
    # the long one lost its answer to truncation: nothing left to train, so dropped
    assert stats.truncated == 1 and stats.dropped == 1 and len(out) == 1


def random_examples(n: int, gen: torch.Generator, max_len: int = 40) -> list[dict]:
    out = []
    for _ in range(n):
        length = int(torch.randint(2, max_len, (1,), generator=gen))
        ids = torch.randint(10, 3000, (length,), generator=gen).tolist()
        labels = [t if torch.rand(1, generator=gen).item() > 0.3 else IGNORE_INDEX for t in ids]
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.mark.parametrize("max_length", [16, 64, 100])
def test_pack_invariants(max_length):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    examples = random_examples(60, gen, max_len=max_length + 10)
    rows = pack(examples, max_length)
    flat_ids, flat_labels = [], []
    for row in rows:
        n = len(row["input_ids"])
        assert 0 < n <= max_length
        assert len(row["labels"]) == n == len(row["position_ids"])
        starts = sequence_starts(row["position_ids"])
        assert starts[0] == 0
        for a, b in zip(starts, [*starts[1:], n], strict=True):
            assert row["position_ids"][a:b] == list(range(b - a))  # restart at 0, count up by 1
            assert row["labels"][a] == IGNORE_INDEX  # nothing predicts across a boundary
        flat_ids += row["input_ids"]
        flat_labels += row["labels"]
    expected_ids, expected_labels = [], []
    for e in examples:
        ids = e["input_ids"][:max_length]
        expected_ids += ids
        expected_labels += [IGNORE_INDEX, *e["labels"][1:len(ids)]]
    assert flat_ids == expected_ids and flat_labels == expected_labels  # order and content kept
    # greedy: the next example did not fit into the previous row
    for row, nxt in zip(rows, rows[1:], strict=False):
        first_len = (sequence_starts(nxt["position_ids"]) + [len(nxt["input_ids"])])[1]
        assert len(row["input_ids"]) + first_len > max_length


def test_packed_collator_pads_with_a_separate_untrained_sequence():
    rows = pack([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]},
                 {"input_ids": [6, 7, 8, 9, 10], "labels": [6, 7, 8, 9, 10]}], 6)
    batch = PackedCollator(pad_id=0)(rows)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 7, 8, 9, 10]]
    batch = PackedCollator(pad_id=0)([rows[0], {"input_ids": [1], "labels": [1], "position_ids": [0]}])
    assert batch["position_ids"][1].tolist() == [0, 0, 1, 2, 3]
    assert batch["labels"][1].tolist() == [1, -100, -100, -100, -100]
    assert trained_tokens(batch["labels"]) == 3  # targets are labels[:, 1:]


def test_unpacked_collator():
    batch = Collator(pad_id=0, max_length=4)([{"input_ids": [1, 2], "labels": [-100, 2]},
                                              {"input_ids": [3, 4, 5, 6, 7], "labels": [3, 4, 5, 6, 7]}])
    assert batch["input_ids"].tolist() == [[1, 2, 0, 0], [3, 4, 5, 6]]
    assert batch["labels"].tolist() == [[-100, 2, -100, -100], [3, 4, 5, 6]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 1, 1], [0, 1, 2, 3]]


def test_load_jsonl_folder_and_datasets_folder(tmp_path):
    rows = [{"text": f"line {i}"} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows[3:]) + "\n\n")
    assert load_records(tmp_path) == rows
    assert load_records(tmp_path / "a.jsonl", max_examples=2) == rows[:2]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert load_records(tmp_path / "ds") == rows
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    assert load_records(tmp_path / "dd", split="train") == rows
    with pytest.raises(ValueError, match="splits train"):
        load_records(tmp_path / "dd", split="test")
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_records(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("accelerate", [False, True])
def test_packed_rows_attend_only_within_their_sequence(tiny_dir, accelerate):
    """A packed row's per-token losses equal those of each sequence run on its own."""
    from tests.train.conftest import load_tiny

    model, _tok = load_tiny(tiny_dir, accelerate=accelerate)
    model.eval()
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    examples = [{"input_ids": torch.randint(10, 3000, (n,), generator=gen).tolist()} for n in (7, 12, 5)]
    for e in examples:
        e["labels"] = list(e["input_ids"])
    rows = pack(examples, 64)
    assert len(rows) == 1
    packed = PackedCollator(0)(rows)

    def token_logprobs(batch):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        return torch.log_softmax(logits.float(), -1)

    joint = token_logprobs(packed)[0]
    offset = 0
    for e in examples:
        n = len(e["input_ids"])
        ids = torch.tensor([e["input_ids"]])
        alone = token_logprobs({"input_ids": ids, "position_ids": torch.arange(n)[None]})[0]
        # same fp32 computation on the same rows; only reduction order/blocking may differ
        torch.testing.assert_close(joint[offset:offset + n], alone, rtol=1e-5, atol=1e-5)
        offset += n
