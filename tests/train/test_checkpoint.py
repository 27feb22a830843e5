"""Checkpoints: atomic writes, exact resume, clear errors for corrupt or incomplete ones."""

from __future__ import annotations

import json
import os

import pytest
import torch

from slipstream.train import checkpoint as ckpt
from slipstream.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from slipstream.train.config import TrainConfig
from slipstream.train.trainer import Trainer
from tests.train.conftest import load_tiny

RECORDS = "builtin:stdlib-qa"


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def make_trainer(tiny_dir, out, *, max_steps=6, save_every=3, dropout=0.1, **kw):
    model, tok = load_tiny(tiny_dir, accelerate=True, dropout=dropout, max_seq_length=64)
    cfg = TrainConfig(max_steps=max_steps, batch_size=2, grad_accum=2, lr=5e-3, warmup_steps=2, save_every=save_every,
                      keep_last=3, output_dir=str(out), seed=3, log_every=100, **kw)
    from slipstream.train.data import load_records

    return Trainer(model, tok, load_records(RECORDS, max_examples=120), cfg, verbose=False), model


def test_exact_resume_matches_a_straight_run(tiny_dir, tmp_path, monkeypatch):
    # warm-up: populate the dispatcher's decisions first (deciding draws from the global RNG, which
    # would shift dropout masks in whichever run decides; all runs below then decide nothing)
    make_trainer(tiny_dir, tmp_path / "warm")[0].train()

    straight, model_a = make_trainer(tiny_dir, tmp_path / "a")
    losses_a = straight.train().losses
    weights_a = lora_state(model_a)

    interrupted, _ = make_trainer(tiny_dir, tmp_path / "b")
    calls = {"n": 0}
    real = interrupted.forward_backward

    def crash_on_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(interrupted, "forward_backward", crash_on_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        interrupted.train()
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [3]

    resumed, model_b = make_trainer(tiny_dir, tmp_path / "b")
    result = resumed.train(resume=True)
    assert result.resumed_from is not None and result.resumed_from.name == "step-00000003"
    # CPU, fp32, the same ops in the same order on the same data and RNG: bit-identical
    assert result.losses == losses_a
    weights_b = lora_state(model_b)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert losses_a[-1] < losses_a[0]


def small_state(tiny_dir):
    model, _ = load_tiny(tiny_dir, accelerate=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(input_ids=torch.randint(10, 3000, (1, 8)), labels=torch.randint(10, 3000, (1, 8))).loss.backward()
    opt.step()
    return model, opt


def test_crash_mid_write_keeps_previous_checkpoint(tiny_dir, tmp_path, monkeypatch):
    model, opt = small_state(tiny_dir)
    first = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, trainer_state={"step": 1}, config={})
    verify_checkpoint(first)
    real_save = torch.save

    def dying_save(obj, path, *a, **k):
        if str(path).endswith("trainer_state.pt"):
            with open(path, "wb") as f:
                f.write(b"half a file")
            raise OSError("No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 2, model=model, optimizer=opt, trainer_state={"step": 2}, config={})
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"]
    verify_checkpoint(first)
    assert load_checkpoint(first, model=model, optimizer=opt) == {"step": 1}

    # a writer killed outright leaves its temporary folder: ignored, then cleaned by the next save
    (tmp_path / "checkpoints" / "step-00000002.tmp-99999").mkdir()
    assert latest_checkpoint(tmp_path) == first
    save_checkpoint(tmp_path, 2, model=model, optimizer=opt, trainer_state={"step": 2}, config={})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]


def test_keep_last(tiny_dir, tmp_path):
    model, opt = small_state(tiny_dir)
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, trainer_state={}, config={}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]


def test_corrupt_and_incomplete_checkpoints_are_named(tiny_dir, tmp_path):
    model, opt = small_state(tiny_dir)
    path = save_checkpoint(tmp_path, 5, model=model, optimizer=opt, trainer_state={"step": 5}, config={})
    optim = path / "optimizer.pt"
    data = optim.read_bytes()
    optim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, model=model, optimizer=opt)
    msg = str(info.value)
    assert "corrupt" in msg and str(optim) in msg and "delete" in msg and "without resuming" in msg

    optim.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # same size, one byte flipped
    with pytest.raises(CheckpointError, match=r"optimizer.pt does not match the sha256"):
        verify_checkpoint(path)

    optim.write_bytes(data)
    verify_checkpoint(path)
    os.remove(path / "manifest.json")
    with pytest.raises(CheckpointError, match=r"incomplete: manifest.json is missing"):
        verify_checkpoint(path)


def test_resume_from_corrupt_checkpoint_fails_clearly(tiny_dir, tmp_path):
    trainer, _ = make_trainer(tiny_dir, tmp_path, max_steps=2, save_every=2, dropout=0.0)
    trainer.train()
    state = latest_checkpoint(tmp_path) / "trainer_state.pt"
    state.write_bytes(b"")
    again, _ = make_trainer(tiny_dir, tmp_path, max_steps=4, save_every=2, dropout=0.0)
    with pytest.raises(CheckpointError, match=r"trainer_state.pt has 0 bytes"):
        again.train(resume=True)


def test_resume_without_checkpoint_starts_fresh(tiny_dir, tmp_path, capsys):
    trainer, _ = make_trainer(tiny_dir, tmp_path, max_steps=1, save_every=0, dropout=0.0)
    trainer.verbose = True
    result = trainer.train(resume=True)
    assert result.resumed_from is None and len(result.losses) == 1
    assert "no checkpoint" in capsys.readouterr().out
