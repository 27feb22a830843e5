"""Fixtures for the training tests: a very small Llama built from the shipped tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from slipstream.train.data import data_dir

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512}


def make_model_dir(root: Path, **overrides) -> Path:
    """A config folder (no weights) with the shipped tokenizer and a tiny Llama config."""
    src = data_dir() / "tiny-llama"
    out = root / "tiny-test-llama"
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    config = json.loads((src / "config.json").read_text())
    config.update(TINY)
    config.update(overrides)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(autouse=True)
def _cpu_kernels_as_users_get_them(monkeypatch):
    """Train the way a CPU user does: without Triton's interpreter, whose kernels would be candidates.

    The interpreter makes every Triton kernel a CPU candidate (how kernel tests run) and is ~100x
    slower than the references; kernel correctness is tested in tests/kernels and tests/ops.
    """
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from slipstream.dispatch import dispatcher

    dispatcher().forget()
    yield
    dispatcher().forget()


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    return make_model_dir(tmp_path / "model")


@pytest.fixture
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(data_dir() / "tiny-llama")


def load_tiny(tiny_dir: Path, *, accelerate: bool = True, dropout: float = 0.0, checkpointing=False, seed: int = 0,
              max_seq_length: int = 128):
    from slipstream.train.fast_model import FastModel

    model, tok = FastModel.from_pretrained(tiny_dir, max_seq_length=max_seq_length, init="random", seed=seed,
                                           device="cpu", verbose=False)
    model = FastModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=dropout,
                                     gradient_checkpointing=checkpointing, accelerate=accelerate, verbose=False)
    return model, tok
