"""Atomic, verifiable training checkpoints.

A checkpoint is a folder ``<output>/checkpoints/step-00000042/``::

    adapter/             peft save_pretrained of the adapter (loads with plain peft)
    optimizer.pt         optimizer state
    trainer_state.pt     step, data position, scheduler, grad scaler, RNG states (python, torch, device)
    config.json          the run's configuration
    manifest.json        size and sha256 of every file above; written last

It is written into ``step-00000042.tmp-<pid>`` and renamed into place only once complete (files and
folder fsync'ed), so a crash mid-write leaves the previous checkpoints as they were and never a
folder that looks complete. Loading checks every file against the manifest; a mismatch raises
:class:`CheckpointError` naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
FORMAT = 1
STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt (the message says which file and what to do)."""


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every renamed-into-place checkpoint, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, model: Any, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, config: dict, keep_last: int | None = None) -> Path:
    """Write checkpoint ``step`` atomically; then keep only the newest ``keep_last`` checkpoints."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("step-*.tmp-*"):  # left by a crashed writer
        print(f"checkpoint: removing {stale.name}, an incomplete checkpoint a crashed run left behind")
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:08d}"
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        model.save_pretrained(str(tmp / "adapter"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync_file(f)
            files[f.relative_to(tmp).as_posix()] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
        manifest = {"format": FORMAT, "step": step, "created": time.time(), "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync_file(tmp / MANIFEST)
        for d in (tmp / "adapter", tmp):
            _fsync_dir(d)
        if final.exists():  # re-saving a step (e.g. after resuming from it): swap, then drop the old one
            old = root / f"{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for _step, old in list_checkpoints(output_dir)[:-keep_last]:
            trash = old.with_name(old.name + f".tmp-{os.getpid()}-deleting")
            os.replace(old, trash)  # out of the step-* namespace first: never a half-deleted "checkpoint"
            shutil.rmtree(trash, ignore_errors=True)
    return final


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check every file of checkpoint ``path`` against its manifest; returns the manifest."""
    path = Path(path)
    advice = (f"delete {path} to resume from the checkpoint before it, or start over without resuming "
              f"(--resume off / resume=False)")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"checkpoint {path} is incomplete: {MANIFEST} is missing (it is written "
                              f"last, so the checkpoint was not finished or was copied partially); {advice}")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: {manifest_path} cannot be read ({exc}); "
                              f"{advice}") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {manifest.get('format')!r}, this slipstream "
                              f"reads format {FORMAT}; {advice}")
    for rel, meta in files.items():
        f = path / rel
        if not f.exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: {f} is missing; {advice}")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {f} has {size} bytes, the manifest "
                                  f"recorded {meta['bytes']} (truncated or overwritten); {advice}")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {f} does not match the sha256 its manifest "
                                  f"recorded (damaged after it was written); {advice}")
    return manifest


def load_checkpoint(path: str | os.PathLike, *, model: Any, optimizer: torch.optim.Optimizer,
                    map_location: torch.device | str = "cpu") -> dict:
    """Verify ``path``, load the adapter into ``model`` and the optimizer state; returns the trainer state."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    path = Path(path)
    verify_checkpoint(path)
    try:
        weights = load_peft_weights(str(path / "adapter"), device=str(map_location))
        result = set_peft_model_state_dict(model, weights)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise CheckpointError(f"checkpoint {path}: the adapter in {path / 'adapter'} does not fit this "
                                  f"model (unexpected weights such as {unexpected[0]}); resume with the same "
                                  f"model and [lora] settings")
        optim_state = torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True)
        optimizer.load_state_dict(optim_state)
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} could not be loaded ({type(exc).__name__}: {exc}); if the "
                              f"model or [lora]/[train] settings changed since it was written, restore them, "
                              f"or start over without resuming") from exc
    return state


__all__ = ["CheckpointError", "checkpoints_dir", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
           "save_checkpoint", "verify_checkpoint"]
