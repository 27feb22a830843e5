"""The ``slipstream`` command: doctor, explain, tune, conformance, bench, train."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import sys
from collections.abc import Sequence

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def _dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        return DTYPES[name]
    except KeyError:
        raise SystemExit(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def _device(name: str | None) -> torch.device:
    from slipstream.device import default_device

    return torch.device(name) if name else default_device()


# --------------------------------------------------------------------------- doctor
def cmd_doctor(args: argparse.Namespace) -> int:
    import slipstream
    from slipstream.device import available_devices
    from slipstream.dispatch import dispatcher
    from slipstream.ops import SPECS
    from slipstream.plugins import strict_mode, system

    plugins = system()
    libs = ["torch", "triton", "transformers", "peft", "bitsandbytes", "pluggy"]
    print(f"slipstream {slipstream.__version__}  (python {sys.version.split()[0]}; "
          + ", ".join(f"{n} {_version(n)}" for n in libs) + ")")
    devices = available_devices()
    print("\nDevices:")
    for info in devices:
        print(f"  {info.describe()}")
    print(f"\nPlugins (entry-point group slipstream.backends; strict mode {'on' if strict_mode() else 'off'}):")
    for name, rec in sorted(plugins.records.items()):
        dist = f"{rec.distribution} {rec.version}".strip() or "-"
        line = f"  {name:<10} {rec.status:<8} {dist:<28} {len(rec.implementations):>3} implementations"
        print(line)
        status = plugins.status(name) if rec.status == "loaded" else ""
        for extra in filter(None, [rec.error, status]):
            print(f"  {'':<10} {extra}")
    info = devices[0]
    print(f"\nOps on {info.describe()} (tuning {'on' if dispatcher().tuning_enabled(info) else 'off'}):")
    for op in SPECS:
        impls = plugins.registry.implementations(op)
        usable = [i.name for i in impls if _safe(i.devices, info)]
        other = [i.name for i in impls if i.name not in usable]
        print(f"  {op:<21} {', '.join(usable) or '-'}" + (f"   (other devices: {len(other)})" if other else ""))
    return 0


def _safe(pred, info) -> bool:
    try:
        return bool(pred(info))
    except Exception:
        return False


# --------------------------------------------------------------------------- explain
def cmd_explain(args: argparse.Namespace) -> int:
    from slipstream.device import device_info
    from slipstream.dispatch import dispatcher, set_tuning
    from slipstream.dispatch.trace import Decision
    from slipstream.ops import SPECS

    device = _device(args.device)
    info = device_info(device)
    if args.cached:
        entries = dispatcher().cache_for(info).entries()
        if not entries:
            print(f"no cached decisions for {info.describe()} in {dispatcher().cache_for(info).path}")
            return 0
        for entry in entries.values():
            decision = Decision.from_json(entry)
            if args.op in (None, decision.op):
                print(decision.format(), end="\n\n")
        return 0
    if args.tune is not None:
        set_tuning(args.tune)
    dtype = _dtype(args.dtype, device)
    ops = [args.op] if args.op else list(SPECS)
    for op in ops:
        spec = SPECS[op]
        samples = spec.samples(device, dtype, args.size)[: args.samples]
        for sample in samples:
            from slipstream.conformance import with_grads

            dispatcher().call(spec, with_grads(spec, sample.args))
    for decision in dispatcher().decisions():
        print(decision.format(), end="\n\n")
    return 0


# --------------------------------------------------------------------------- tune
def cmd_tune(args: argparse.Namespace) -> int:
    from slipstream.dispatch import dispatcher, set_tuning
    from slipstream.tuning import ModelShape, tune

    config = _load_model_config(args.model)
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    set_tuning(True)
    decisions = tune(ModelShape.from_config(config), args.batch, args.seq, device, dtype, args.lora_rank)
    for d in decisions:
        print(f"{d.op:<21} {d.chosen:<48} {d.mode:<7} [{d.shapes}]")
    from slipstream.device import device_info

    print(f"\nsaved to {dispatcher().cache_for(device_info(device)).path}")
    return 0


def _load_model_config(path: str):
    from transformers import AutoConfig, PretrainedConfig

    if path.endswith(".json"):
        with open(path) as fh:
            data = json.load(fh)
        model_type = data.get("model_type")
        if not model_type:
            raise SystemExit(f"{path}: a transformers config.json needs a `model_type`")
        from transformers import CONFIG_MAPPING

        return CONFIG_MAPPING[model_type](**{k: v for k, v in data.items() if k != "model_type"})
    config = AutoConfig.from_pretrained(path)
    assert isinstance(config, PretrainedConfig)
    return config


# --------------------------------------------------------------------------- conformance
def cmd_conformance(args: argparse.Namespace) -> int:
    from slipstream import conformance
    from slipstream.device import device_info

    device = _device(args.device)
    dtypes = tuple(_dtype(d, device) for d in args.dtype) if args.dtype else None
    try:
        checks = conformance.run(args.plugin, device, args.size, dtypes, ops=tuple(args.op or ()),
                                 progress=(lambda c: print(("." if c.ok else "F"), end="", flush=True)))
    except LookupError as exc:
        print(f"slipstream conformance: {exc}", file=sys.stderr)
        return 2
    print()
    print(conformance.format_table(checks))
    failed = [c for c in checks if not c.ok]
    info = device_info(device)
    if not checks:
        print(f"\n0 checks ran: no implementation of {args.plugin} runs on {info.describe()}. "
              "Run this on the plugin's hardware.")
        return 3
    print(f"\n{len(checks) - len(failed)} passed, {len(failed)} failed  ({args.plugin} on {info.describe()})")
    return 1 if failed else 0


# --------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from slipstream.overhead import measure_overhead

    result = measure_overhead(rows=args.rows, hidden=args.hidden, calls=args.calls)
    for key, value in result.items():
        print(f"{key:<24} {value:.3f}" if isinstance(value, float) else f"{key:<24} {value}")
    return 0


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slipstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("doctor", help="versions, devices, plugins (loaded or failed and why), ops and candidates")

    p = sub.add_parser("explain", help="run ops on sample inputs and print each decision trace")
    p.add_argument("--op", help="one op (default: all)")
    p.add_argument("--device", help="torch device (default: first accelerator, else cpu)")
    p.add_argument("--dtype", help="fp32 | bf16 | fp16 (default: bf16 on GPUs, fp32 on CPU)")
    p.add_argument("--size", default="small", choices=("small", "real"), help="sample shapes")
    p.add_argument("--samples", type=int, default=1, help="samples per op")
    p.add_argument("--tune", action=argparse.BooleanOptionalAction, default=None,
                   help="verify+time candidates (default: on for GPUs)")
    p.add_argument("--cached", action="store_true", help="print the decisions saved on disk instead")

    p = sub.add_parser("tune", help="pre-tune every op shape of a model's training step and save the cache")
    p.add_argument("--model", required=True, help="a model folder / hub id, or a config.json")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--device")
    p.add_argument("--dtype")

    p = sub.add_parser("conformance", help="check a plugin's implementations against the references here")
    p.add_argument("plugin", help="plugin or distribution name, e.g. slipstream-nvidia")
    p.add_argument("--device")
    p.add_argument("--dtype", action="append", help="limit to dtypes (repeatable)")
    p.add_argument("--size", default="small", choices=("small", "real"))
    p.add_argument("--op", action="append", help="limit to these ops (repeatable)")

    p = sub.add_parser("bench", help="measure the dispatcher's per-call overhead")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--calls", type=int, default=20000)

    try:
        from slipstream.train import cli as train_cli
    except ImportError:
        train_cli = None
    if train_cli is not None and hasattr(train_cli, "add_parser"):
        train_cli.add_parser(sub)
    return parser


COMMANDS = {"doctor": cmd_doctor, "explain": cmd_explain, "tune": cmd_tune, "conformance": cmd_conformance,
            "bench": cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from slipstream.train import cli as train_cli

        return int(train_cli.run(args) or 0)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
