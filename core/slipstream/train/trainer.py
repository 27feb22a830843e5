"""The training loop: AdamW, warmup + decay schedule, gradient accumulation, checkpoints, metrics.

Loss normalisation: the loss of one optimizer step is the sum of every trained token's loss over
the whole accumulated batch divided by the number of trained tokens in it, not the mean of the
micro-batch means. Each micro-batch's mean loss (the model's own, over its ``n`` trained tokens)
is scaled by ``n / N`` before ``backward`` (``N`` = trained tokens of all micro-batches of the
step), which is the same as summing token losses and dividing by ``N``; it only needs the model to
return the standard mean causal-LM loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slipstream.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from slipstream.train.config import TrainConfig
from slipstream.train.data import (
    Collator,
    load_records,
    pad_token_id,
    tokenize_records,
    trained_tokens,
)
from slipstream.train.fast_model import model_info, resolve_dtype, save_merged
from slipstream.train.offload import disable_graphs
from slipstream.train.packing import PackedCollator, pack

GIB = 2**30


# ----------------------------------------------------------------------------- schedule and sampler
def lr_lambda(total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0):
    """Multiplier of the peak learning rate at step ``s`` (0-based, before the step's update)."""

    def factor(s: int) -> float:
        if warmup_steps and s < warmup_steps:
            return (s + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (s - warmup_steps) / span)
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * decay

    return factor


class RowSampler:
    """An endless stream of row indices: a fresh seeded permutation per epoch. State: (epoch, cursor)."""

    def __init__(self, n_rows: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle = n_rows, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order: list[int] | None = None

    def _perm(self) -> list[int]:
        if self._order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + self.epoch)
                self._order = torch.randperm(self.n, generator=g).tolist()
            else:
                self._order = list(range(self.n))
        return self._order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            order = self._perm()
            need = k - len(out)
            out += order[self.cursor:self.cursor + need]
            self.cursor += need
            if self.cursor >= self.n:
                self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "n": self.n,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise CheckpointError(f"the checkpoint was written for {state['n']} rows with seed "
                                  f"{state['seed']}, but this run has {self.n} rows with seed {self.seed}: "
                                  f"the data or its settings changed; restore them or start over without "
                                  f"resuming")
        self.epoch, self.cursor, self._order = state["epoch"], state["cursor"], None


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, keys.tolist(), int(pos), int(has_gauss), float(cached))
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np = sys.modules.get("numpy")
    if "numpy" in state and np is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed % 2**32)


# ----------------------------------------------------------------------------- reporting
def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    xpu = getattr(torch, "xpu", None)
    if device.type == "xpu" and xpu is not None:
        return xpu.max_memory_allocated(device) / GIB
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / GIB if sys.platform == "darwin" else rss * 1024 / GIB
    except ImportError:  # pragma: no cover - Windows
        return 0.0


def chosen_kernels() -> dict[str, dict[str, int]]:
    """``{op: {implementation: number of shape keys it was chosen for}}`` from :func:`slipstream.explain`."""
    from slipstream.dispatch import explain

    out: dict[str, dict[str, int]] = {}
    for d in explain():
        out.setdefault(d.op, {})
        label = f"{d.chosen} ({d.mode})"
        out[d.op][label] = out[d.op].get(label, 0) + 1
    return out


def format_kernels(kernels: dict[str, dict[str, int]]) -> str:
    if not kernels:
        return "kernels chosen: none (no slipstream op ran; was the model accelerated?)"
    lines = ["kernels chosen (op -> implementation):"]
    for op, impls in kernels.items():
        parts = [f"{impl}" + (f" x{n} shapes" if n > 1 else "") for impl, n in impls.items()]
        lines.append(f"  {op:<22} -> {', '.join(parts)}")
    return "\n".join(lines)


_cpu_threads: int | None = None


def busy_cores(sample_s: float = 0.3) -> float | None:
    """How many cores other work keeps busy right now (from /proc/stat over ``sample_s``), or None."""
    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = read()
        time.sleep(sample_s)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    busy = 1.0 - (idle1 - idle0) / max(1, total1 - total0)
    return busy * (os.cpu_count() or 1)


def adapt_cpu_threads() -> str | None:
    """On a busy machine, use only the cores other work leaves idle (decided once per process).

    PyTorch's CPU ops run on an OpenMP team of ``torch.get_num_threads()`` threads that meet at a
    barrier after each op; when another process holds one of those cores, every op waits for a
    descheduled thread. With a small model (many short ops) that made a 2-core run 4x slower than
    one thread (and one thread is 1.8x slower than two on idle cores). How busy the cores are is
    sampled from /proc/stat for 0.3 s (the load average where that is missing). ``OMP_NUM_THREADS``
    or ``SLIPSTREAM_CPU_THREADS`` set by the user win. Returns a note when it changed something.
    """
    global _cpu_threads
    if _cpu_threads is not None:
        if torch.get_num_threads() != _cpu_threads:
            torch.set_num_threads(_cpu_threads)
        return None
    forced = os.environ.get("SLIPSTREAM_CPU_THREADS")
    current = torch.get_num_threads()
    reason = "SLIPSTREAM_CPU_THREADS"
    if forced:
        _cpu_threads = max(1, int(forced))
    elif os.environ.get("OMP_NUM_THREADS"):
        _cpu_threads = current
    else:
        busy = busy_cores()
        if busy is None:
            try:
                busy = os.getloadavg()[0]
            except (OSError, AttributeError):
                busy = 0.0
        total = os.cpu_count() or 1
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
        idle = max(1, min(usable, int(total - busy + 0.5)))
        _cpu_threads = min(current, idle)
        reason = f"{busy:.1f} of {total} cores busy with other work"
    if _cpu_threads != current:
        torch.set_num_threads(_cpu_threads)
        return (f"cpu: {reason} -> {_cpu_threads} thread(s) instead of {current} (set OMP_NUM_THREADS "
                f"or SLIPSTREAM_CPU_THREADS to choose)")
    return None


class _Progress:
    """tqdm on a terminal (when installed), else plain lines."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, postfix: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    seconds: float
    tokens: int
    output_dir: Path
    adapter_dir: Path | None = None
    merged_dir: Path | None = None
    last_checkpoint: Path | None = None
    kernels: dict = field(default_factory=dict)
    resumed_from: Path | None = None


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Train a peft model on a dataset.

    Args:
        model: a peft model (from :meth:`FastModel.get_peft_model`, or any ``PeftModel``).
        tokenizer: its tokenizer (chat template used for chat/instruction records).
        train_dataset: a path (JSONL file or folder, ``datasets`` folder, ``builtin:stdlib-qa``), a
            ``datasets.Dataset``, or a list of dicts (chat, instruction, text or tokenized records).
        config: :class:`TrainConfig`.
        data_format: ``"auto"`` or one of ``instruction``, ``chat``, ``text``, ``tokens``.
        run_config: the whole run's settings, stored in checkpoints (the CLI passes it).
    """

    def __init__(self, model: Any, tokenizer: Any, train_dataset: Any, config: TrainConfig | None = None, *,
                 data_format: str = "auto", run_config: dict | None = None, verbose: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.train_dataset = train_dataset
        self.config = config or TrainConfig()
        self.data_format = data_format
        self.run_config = run_config
        self.verbose = verbose
        self.device = next(model.parameters()).device
        info = model_info(model)
        self.max_length = int(self.config.max_seq_length or info.get("max_seq_length")
                              or min(getattr(tokenizer, "model_max_length", 2048) or 2048, 2048))
        self.rows: list[dict] | None = None
        self.collate = None

    # ------------------------------------------------------------------ setup
    def log(self, message: str) -> None:
        if self.verbose:
            print(message, flush=True)

    def prepare_data(self) -> list[dict]:
        """Tokenize (and pack) the dataset into rows; idempotent."""
        if self.rows is not None:
            return self.rows
        cfg = self.config
        records = load_records(self.train_dataset)
        pad = pad_token_id(self.tokenizer)
        if all("position_ids" in r for r in records[:1]):  # already packed rows
            self.rows, self.collate = records, PackedCollator(pad)
            self.log(f"data: {len(records)} pre-packed rows")
            return self.rows
        examples, stats = tokenize_records(records, self.tokenizer, fmt=self.data_format,
                                           completion_only=cfg.completion_only, max_length=self.max_length)
        if not examples:
            raise ValueError("no example has a trained token left (check completion_only and max_seq_length)")
        if cfg.packing:
            order = list(range(len(examples)))
            random.Random(cfg.seed).shuffle(order)
            self.rows = pack([examples[i] for i in order], self.max_length)
            self.collate = PackedCollator(pad)
            fill = stats.tokens / (len(self.rows) * self.max_length)
            self.log(f"data: {stats.describe()} -> {len(self.rows)} packed rows of <= {self.max_length} "
                     f"tokens ({fill:.0%} full)")
        else:
            self.rows, self.collate = examples, Collator(pad, self.max_length)
            self.log(f"data: {stats.describe()}, unpacked (max {self.max_length} tokens)")
        return self.rows

    def total_steps(self) -> int:
        cfg = self.config
        if cfg.max_steps is not None:
            return cfg.max_steps
        rows = len(self.prepare_data())
        return max(1, math.ceil(cfg.epochs * rows / (cfg.batch_size * cfg.grad_accum)))

    def _precision(self) -> tuple[torch.dtype | None, bool]:
        """(autocast dtype or None, whether to scale gradients)."""
        p = self.config.precision
        compute = next((q.dtype for n, q in self.model.named_parameters() if q.is_floating_point()
                        and "lora_" not in n), torch.float32)
        if p == "auto":
            target = compute if compute in (torch.bfloat16, torch.float16) else None
        elif p == "fp32":
            target = None
        else:
            target = resolve_dtype(p, self.device)
        return target, target == torch.float16

    def _autocast(self, dtype: torch.dtype | None):
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _plan_checkpointing(self) -> None:
        info = model_info(self.model)
        if info.get("gradient_checkpointing_requested") != "auto":
            return
        from slipstream.train.memory import plan_for_model

        graphs = False if self.config.packing else info.get("cuda_graphs")  # packed: see train()
        plan = plan_for_model(self.model, batch=self.config.batch_size, seq=self.max_length,
                              max_memory_gib=self.config.max_memory_gib, graphs=graphs)
        self.log(f"{plan.describe()} (batch {self.config.batch_size} x {self.max_length})")
        plan.apply(self.model, verbose=self.verbose)

    def _settings(self) -> dict:
        return {"train": dataclasses.asdict(self.config), "run": self.run_config,
                "model": model_info(self.model)}

    # ------------------------------------------------------------------ the loop
    def train(self, resume: bool | str | os.PathLike | None = None) -> TrainResult:
        """Train; ``resume`` True (latest checkpoint in the output folder), a checkpoint path, or False.

        ``None`` uses ``config.resume``.
        """
        cfg = self.config
        start_time = time.perf_counter()
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        if self.device.type == "cpu":
            note = adapt_cpu_threads()
            if note:
                self.log(note)
        rows = self.prepare_data()
        total = self.total_steps()
        self._plan_checkpointing()
        if self.config.packing:
            # each packed batch has its own layout (position ids): graphs captured for one never replay
            note = disable_graphs(self.model, "packed batches change their layout every step")
            if note:
                self.log(note)
        model = self.model
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters; add adapters with "
                             "FastModel.get_peft_model")
        fused = self.device.type == "cuda" and all(p.is_floating_point() for p in params)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                                      **({"fused": True} if fused else {}))
        warmup = cfg.warmup_steps or round(cfg.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(total, warmup, cfg.schedule, cfg.min_lr_ratio))
        autocast_dtype, scale = self._precision()
        scaler = torch.amp.GradScaler(self.device.type) if scale else None
        sampler = RowSampler(len(rows), cfg.seed)
        start_step, losses, resumed_from = 0, [], None

        resume = cfg.resume if resume is None else resume
        if resume:
            path = latest_checkpoint(out) if resume is True else Path(resume)
            if path is None:
                self.log(f"resume: no checkpoint in {out / 'checkpoints'}; starting from step 0")
            else:
                state = load_checkpoint(path, model=model, optimizer=optimizer, map_location=self.device)
                scheduler.load_state_dict(state["scheduler"])
                if scaler is not None and state.get("scaler"):
                    scaler.load_state_dict(state["scaler"])
                sampler.load_state_dict(state["sampler"])
                start_step, losses, resumed_from = state["step"], list(state.get("losses", [])), path
                if state.get("total_steps") not in (None, total):
                    self.log(f"resume: the checkpoint's run had {state['total_steps']} steps, this one "
                             f"{total}: the learning-rate schedule follows the new total")
                set_rng_state(state["rng"])
                self.log(f"resume: continuing from {path} at step {start_step}")

        metrics_path = out / "metrics.jsonl"
        metrics = self._open_metrics(metrics_path, start_step) if cfg.metrics else None
        tb = self._tensorboard(out)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        progress = _Progress(total, start_step, self.verbose)
        precision = str(autocast_dtype).removeprefix("torch.") if autocast_dtype else "fp32"
        self.log(f"train: {total} steps x {cfg.batch_size} rows x {cfg.grad_accum} accumulation, lr "
                 f"{cfg.lr:g} ({cfg.schedule}, {warmup} warmup), precision {precision}, on {self.device}")
        tokens_seen, loop_start, last_ckpt = 0, time.perf_counter(), None
        last_logged = len(losses)
        try:
            for step in range(start_step, total):
                t0 = time.perf_counter()
                micro = [[rows[i] for i in sampler.take(cfg.batch_size)] for _ in range(cfg.grad_accum)]
                step_tokens = sum(len(r["input_ids"]) for mb in micro for r in mb)
                batches = [self.collate(mb) for mb in micro]
                loss_sum, n_total = self.forward_backward(batches, autocast_dtype=autocast_dtype, scaler=scaler)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = None
                if cfg.max_grad_norm:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                lr = optimizer.param_groups[0]["lr"]
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss_value = float(loss_sum)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                losses.append(loss_value)
                tokens_seen += step_tokens
                record = {"step": step + 1, "loss": loss_value, "lr": lr, "tokens": step_tokens,
                          "tokens_per_s": step_tokens / dt, "peak_mem_gib": peak_memory_gib(self.device),
                          "grad_norm": grad_norm, "epoch": sampler.epoch + sampler.cursor / len(rows),
                          "trained_tokens": n_total, "seconds": dt}
                if metrics is not None:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                if tb is not None:
                    for k in ("loss", "lr", "tokens_per_s", "peak_mem_gib"):
                        tb.add_scalar(f"train/{k}", record[k], step + 1)
                avg_tps = tokens_seen / (time.perf_counter() - loop_start)
                progress.update({"loss": f"{loss_value:.3f}", "tok/s": f"{avg_tps:,.0f}",
                                 "peak": f"{record['peak_mem_gib']:.2f}G"})
                if (step + 1) % cfg.log_every == 0 or step + 1 == total or step == start_step:
                    window = losses[max(last_logged, len(losses) - cfg.log_every):]
                    last_logged = len(losses)
                    mean = f" (mean of {len(window)}: {sum(window) / len(window):.3f})" if len(window) > 1 else ""
                    progress.write(f"step {step + 1:>5}/{total}  loss {loss_value:7.4f}{mean}  lr {lr:.2e}  "
                                   f"tok/s {avg_tps:,.0f}  peak {record['peak_mem_gib']:.2f} GiB")
                if cfg.save_every and ((step + 1) % cfg.save_every == 0 or step + 1 == total):
                    state = {"step": step + 1, "total_steps": total, "sampler": sampler.state_dict(),
                             "scheduler": scheduler.state_dict(),
                             "scaler": scaler.state_dict() if scaler is not None else None,
                             "rng": rng_state(), "losses": losses, "format": 1}
                    last_ckpt = save_checkpoint(out, step + 1, model=model, optimizer=optimizer,
                                                trainer_state=state, config=self._settings(),
                                                keep_last=cfg.keep_last)
                    progress.write(f"checkpoint: {last_ckpt}")
        finally:
            progress.close()
            if metrics is not None:
                metrics.close()
            if tb is not None:
                tb.close()

        result = TrainResult(steps=total, losses=losses, seconds=time.perf_counter() - start_time,
                             tokens=tokens_seen, output_dir=out, last_checkpoint=last_ckpt,
                             resumed_from=resumed_from)
        if cfg.save_adapter:
            result.adapter_dir = self.save_adapter(out / "adapter")
            self.log(f"adapter saved to {result.adapter_dir}")
        if cfg.save_merged:
            result.merged_dir = self.save_merged(out / "merged", adapter_dir=result.adapter_dir)
            self.log(f"merged weights saved to {result.merged_dir}")
        result.kernels = chosen_kernels()
        self.log(format_kernels(result.kernels))
        if losses:
            k = max(1, min(cfg.log_every, len(losses) // 4))
            first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
            self.log(f"done: {total - start_step} steps in {result.seconds:.1f} s; loss {first:.3f} -> {last:.3f} "
                     f"(mean of the first and last {k} steps)")
        return result

    def forward_backward(self, batches: Sequence[dict], *, autocast_dtype: torch.dtype | None = None,
                         scaler: Any = None) -> tuple[torch.Tensor, int]:
        """Accumulate the gradients of one optimizer step over its micro-batches.

        Returns (the step's loss, trained tokens): the loss is the sum of token losses over every
        micro-batch divided by the number of trained tokens of all of them together.
        """
        n_total = sum(trained_tokens(b["labels"]) for b in batches)
        loss_sum = torch.zeros((), device=self.device)
        for batch in batches:
            n = trained_tokens(batch["labels"])
            if n == 0:
                continue
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self._autocast(autocast_dtype):
                output = self.model(**batch, use_cache=False)
            loss = output.loss.float() * (n / n_total)  # the micro-batch mean -> its share of sum / N
            (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sum += loss.detach()
        return loss_sum, n_total

    # ------------------------------------------------------------------ outputs
    def save_adapter(self, directory: str | os.PathLike) -> Path:
        """peft ``save_pretrained`` of the adapter (and the tokenizer), written atomically."""
        directory = Path(directory)
        tmp = directory.with_name(directory.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(str(tmp))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(tmp))
        old = directory.with_name(directory.name + f".old-{os.getpid()}")
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
        return directory

    def save_merged(self, directory: str | os.PathLike, *,
                    adapter_dir: str | os.PathLike | None = None) -> Path:
        """Merge the adapter into base weights (the model's dtype, or ``merged_dtype``) and save them."""
        info = model_info(self.model)
        if adapter_dir is None:
            adapter_dir = self.save_adapter(Path(directory).with_name(Path(directory).name + "-adapter"))
        base = info.get("source") or next(iter(self.model.peft_config.values())).base_model_name_or_path
        if self.config.merged_dtype == "auto":
            dtype = resolve_dtype(info.get("dtype"), self.device) if info.get("dtype") else torch.float32
        else:
            dtype = resolve_dtype(self.config.merged_dtype, self.device)
        return save_merged(adapter_dir, directory, base=base, dtype=dtype, tokenizer=self.tokenizer,
                           trust_remote_code=bool(info.get("trust_remote_code")))

    def _open_metrics(self, path: Path, start_step: int):
        kept = []
        if start_step and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        f = path.open("w")
        f.writelines(line + "\n" for line in kept)
        return f

    def _tensorboard(self, out: Path):
        want = self.config.tensorboard
        if want is False:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if want is True:
                self.log("tensorboard: not installed (pip install tensorboard); metrics go to "
                         "metrics.jsonl only")
            return None
        return SummaryWriter(str(out / "tensorboard"))


def evaluate_loss(model: Any, batches: Sequence[dict]) -> float:
    """Token-weighted mean loss of ``model`` over ``batches`` (no gradients)."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in batches:
            n = trained_tokens(batch["labels"])
            if n == 0:
                continue
            out = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
            total += float(out.loss) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


__all__ = ["RowSampler", "TrainResult", "Trainer", "chosen_kernels", "evaluate_loss", "format_kernels",
           "lr_lambda", "rng_state", "set_rng_state"]
