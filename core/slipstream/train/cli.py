"""``slipstream train CONFIG.toml``: one TOML file in, a trained adapter out.

Wired into the main CLI through :func:`add_parser` and :func:`run`; also runs standalone::

    python -m slipstream.train.cli configs/quickstart.toml [--resume] [--max-steps N] [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from slipstream.train.config import ConfigError, RunConfig, load_config


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``train`` sub-command to ``subparsers``; its handler is :func:`run`."""
    parser = subparsers.add_parser("train", help="fine-tune a model with LoRA from a TOML config",
                                   description=__doc__.splitlines()[0])
    configure(parser)
    parser.set_defaults(func=run)
    return parser


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("config", help="TOML run file ([model] [data] [lora] [train] [checkpoint] [output])")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--max-steps", type=int, default=None, help="override [train] max_steps")
    parser.add_argument("--output-dir", default=None, help="override [output] dir")
    parser.add_argument("--device", default=None, help="override [model] device (e.g. cpu, cuda:1)")
    parser.add_argument("--quiet", action="store_true", help="print less")
    return parser


def build_config(args: argparse.Namespace) -> RunConfig:
    cfg = load_config(args.config)
    train = cfg.train
    changes = {}
    if args.resume:
        changes["resume"] = True
    if args.max_steps is not None:
        changes["max_steps"] = args.max_steps
    if args.output_dir is not None:
        changes["output_dir"] = args.output_dir
    if changes:
        cfg.train = dataclasses.replace(train, **changes)
    if getattr(args, "device", None):
        cfg.model = dataclasses.replace(cfg.model, device=args.device)
    return cfg


def train_from_config(cfg: RunConfig, *, verbose: bool = True):
    """Build the model, add LoRA, load the data and train, as the config says; returns the TrainResult."""
    from slipstream.train.fast_model import FastModel
    from slipstream.train.trainer import Trainer

    m, lora = cfg.model, cfg.lora
    model, tokenizer = FastModel.from_pretrained(
        m.name, max_seq_length=m.max_seq_length, dtype=m.dtype, load_in_4bit=m.load_in_4bit,
        device=None if m.device == "auto" else m.device, init=m.init, seed=cfg.train.seed,
        attn_implementation=m.attn_implementation, trust_remote_code=m.trust_remote_code, verbose=verbose)
    model = FastModel.get_peft_model(
        model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        gradient_checkpointing=lora.gradient_checkpointing, modules_to_save=lora.modules_to_save,
        accelerate=m.accelerate, random_state=cfg.train.seed, verbose=verbose)
    from slipstream.train.data import load_records

    records = load_records(cfg.data.path, split=cfg.data.split, max_examples=cfg.data.max_examples)
    trainer = Trainer(model, tokenizer, records, cfg.train, data_format=cfg.data.format,
                      run_config=cfg.to_dict(), verbose=verbose)
    return trainer.train()


def run(args: argparse.Namespace) -> int:
    """Handler of ``slipstream train``: returns the process exit code."""
    from slipstream.train.checkpoint import CheckpointError

    start = time.perf_counter()
    try:
        cfg = build_config(args)
    except ConfigError as exc:
        print(f"slipstream train: {exc}", file=sys.stderr)
        return 2
    try:
        result = train_from_config(cfg, verbose=not getattr(args, "quiet", False))
    except CheckpointError as exc:
        print(f"slipstream train: {exc}", file=sys.stderr)
        return 1
    print(f"slipstream train: finished in {time.perf_counter() - start:.1f} s (wall, including model build); "
          f"outputs in {result.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = configure(argparse.ArgumentParser(prog="slipstream train", description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
