#!/usr/bin/env python
"""Compile every portable kernel x every config each installed backend registers, for every GPU
target that backend claims, ahead of time on a machine without any GPU.

For each backend (``nvidia``: sm_80, sm_90; ``rocm``: gfx90a, gfx942, gfx1100; ``xpu``: none, see
backends/xpu/README.md) the configs are the ones the backend's registered implementation gives
for a representative device of the target (an A100 for sm_80, an MI300X for gfx942, ...), read
through the real plugin registry. Each config's ``kernel.aot(config)`` units are compiled with
``triton.compile`` for the target, with the config's backend-specific compile options added
(``waves_per_eu``, ``matrix_instr_nonkdim``, ``kpack`` on HIP). A unit fails if it doesn't compile,
if its shared memory (LDS) exceeds the target's limit, or if ``num_warps x warp`` exceeds 1024
threads. Identical units (same jit function, signature, constants, options, target) compile once.

Usage:
    python ci/compile_matrix.py [--backend rocm] [--target gfx942] [--kernel rms_norm] [--config 0]
                                [--jobs 2] [--json out.json] [--extra-kernels tests.backends.toy_kernels]

Prints a table (kernel, config, target, ok, shared bytes, registers, spills: the worst unit of each
row) and a summary line; exits 1 naming every failing kernel/config/target, 2 on bad arguments.
Registers and spills come from ptxas' report on CUDA (registers per thread, bytes of spill stores)
and from the AMDGPU assembly on HIP (VGPRs incl. AGPRs, VGPRs spilled to scratch); "?" if unknown.
Spills are reported, not failed: they cost speed, not correctness.
"""

from __future__ import annotations

import os
import sys

# Compiling needs real @triton.jit functions: the CPU interpreter must be off before any kernel
# module is imported. A private, fresh Triton cache keeps runs cold and comparable.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("SLIPSTREAM_QUIET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

KIB = 1024
GENERIC_OPTIONS = {"num_warps", "num_stages", "num_ctas"}


@dataclass(frozen=True)
class Target:
    """One compile target: Triton's ``GPUTarget(backend, arch, warp)`` plus the device whose tuning
    space is compiled and the limits every unit must respect."""

    name: str
    backend: str
    arch: Any
    warp: int
    device: Any
    shared_limit: int
    max_threads: int = 1024

    def gpu_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget(self.backend, self.arch, self.warp)


@dataclass
class Backend:
    name: str
    module: str
    targets: Callable[[], list[Target]]
    space: Callable[[Any], Callable]
    optional_targets: Callable[[], list[Target]] = lambda: []
    no_targets_reason: str = ""


def _nvidia_device(name: str, arch: str, family: str, sms: int, gib: int):
    from slipstream.device import DeviceInfo

    return DeviceInfo(vendor="nvidia", type="cuda", name=name, arch=arch, family=family, warp_size=32,
                      memory_bytes=gib * 2**30, compute_units=sms, versions={"cuda": "simulated"})


NVIDIA_SHARED = {80: 163 * KIB, 86: 99 * KIB, 89: 99 * KIB, 90: 227 * KIB, 100: 227 * KIB, 120: 99 * KIB}
"""Largest dynamic shared memory per block (opt-in) by compute capability."""


def _nvidia_targets() -> list[Target]:
    from slipstream_nvidia.spaces import COMPILE_TARGETS

    devices = {80: _nvidia_device("NVIDIA A100-SXM4-80GB", "sm_80", "ampere", 108, 80),
               90: _nvidia_device("NVIDIA H100 80GB HBM3", "sm_90", "hopper", 132, 80)}
    out = []
    for backend, cc, warp in COMPILE_TARGETS:
        from slipstream.device import nvidia_family

        device = devices.get(cc) or _nvidia_device(f"NVIDIA sm_{cc}", f"sm_{cc}",
                                                   nvidia_family(cc // 10, cc % 10),
                                                   100, 80)
        out.append(Target(f"sm_{cc}", backend, cc, warp, device, NVIDIA_SHARED.get(cc, 99 * KIB)))
    return out


def _nvidia_space(kernel):
    from slipstream_nvidia.spaces import configs_for

    return configs_for(kernel.name, kernel.configs)


def _rocm(targets) -> list[Target]:
    return [Target(t.arch, "hip", t.arch, t.wave, t.device, t.shared_limit, t.max_threads) for t in targets]


def _rocm_targets() -> list[Target]:
    from slipstream_rocm.families import COMPILE_TARGETS

    return _rocm(COMPILE_TARGETS)


def _rocm_optional() -> list[Target]:
    from slipstream_rocm.families import EXTRA_TARGETS

    return _rocm(EXTRA_TARGETS)


def _rocm_space(kernel):
    from slipstream_rocm.spaces import configs_for

    return configs_for(kernel)


def _xpu_space(kernel):
    from slipstream_xpu.spaces import configs_for

    return configs_for(kernel)


BACKENDS = {
    "nvidia": Backend("nvidia", "slipstream_nvidia", _nvidia_targets, _nvidia_space),
    "rocm": Backend("rocm", "slipstream_rocm", _rocm_targets, _rocm_space, _rocm_optional),
    "xpu": Backend("xpu", "slipstream_xpu", lambda: [], _xpu_space, no_targets_reason=(
        "no ahead-of-time targets: Triton's XPU backend (pytorch-triton-xpu) is not installable from PyPI "
        "and is not installed here; see backends/xpu/README.md")),
}


# --------------------------------------------------------------------------- jobs
@dataclass
class Unit:
    """One compilation: a unit of one (kernel, config) on one target."""

    target: Target
    name: str
    fn: Any
    signature: dict
    constexprs: dict
    options: dict

    def key(self) -> tuple:
        return (self.target.name, id(self.fn), tuple(sorted(self.signature.items())),
                tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
                tuple(sorted((k, repr(v)) for k, v in self.options.items())))


@dataclass
class Row:
    """One (kernel, config, target): its units and their results."""

    backend: str
    kernel: str
    config_index: int
    config: dict | None
    target: str
    units: list[int] = field(default_factory=list)
    error: str = ""


def config_label(config: dict | None) -> str:
    if not config:
        return "-"
    return ",".join(f"{k}={v}" for k, v in sorted(config.items()))


_option_fields: dict[str, set[str]] = {}


def option_fields(target: Target) -> set[str]:
    """The compile options Triton's backend for ``target`` understands (its options dataclass)."""
    if target.backend not in _option_fields:
        from triton.compiler.compiler import make_backend

        opts = make_backend(target.gpu_target()).parse_options({})
        _option_fields[target.backend] = {f.name for f in dataclasses.fields(opts)}
    return _option_fields[target.backend]


def backend_options(config: dict | None, target: Target, unit_options: dict) -> dict:
    """The config's backend-specific compile options the unit doesn't set itself (``waves_per_eu``,
    ``matrix_instr_nonkdim``, ``kpack`` on HIP); generic ones (num_warps, ...) stay the unit's."""
    if not config:
        return {}
    fields = option_fields(target) - GENERIC_OPTIONS
    return {k: v for k, v in config.items() if k in fields and k not in unit_options}


# --------------------------------------------------------------------------- compiling (workers)
_UNITS: list[Unit] = []


def _registers_hip(asm: str) -> tuple[int, int]:
    def grab(name: str) -> int:
        found = re.findall(rf"\.{name}:\s+(\d+)", asm)
        return max(map(int, found)) if found else 0

    # VGPR spills go to scratch memory (slow); SGPR spills land in VGPR lanes and are cheap: not counted.
    return grab("vgpr_count"), grab("vgpr_spill_count")


def _registers_cuda(log: str) -> tuple[int, int]:
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    return (max(map(int, regs)) if regs else -1), (max(map(int, spills)) if spills else -1)


def compile_one(index: int) -> dict:
    """Compile ``_UNITS[index]``: ok, shared bytes, registers, spills, seconds, error."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    unit = _UNITS[index]
    started = time.perf_counter()
    out = {"ok": False, "shared": 0, "registers": -1, "spills": -1, "num_warps": 0, "error": ""}
    captured = io.StringIO()
    try:
        knobs.nvidia.dump_ptxas_log = True
        src = ASTSource(fn=unit.fn, signature=dict(unit.signature), constexprs=dict(unit.constexprs))
        with contextlib.redirect_stdout(captured), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kernel = triton.compile(src, target=unit.target.gpu_target(), options=dict(unit.options))
        meta = kernel.metadata
        out["shared"] = int(getattr(meta, "shared", 0) or 0)
        out["num_warps"] = int(getattr(meta, "num_warps", 0) or unit.options.get("num_warps", 4))
        if unit.target.backend == "hip":
            out["registers"], out["spills"] = _registers_hip(kernel.asm.get("amdgcn", ""))
        elif unit.target.backend == "cuda":
            out["registers"], out["spills"] = _registers_cuda(captured.getvalue())
        problems = []
        if out["shared"] > unit.target.shared_limit:
            problems.append(f"shared memory {out['shared']} B > {unit.target.shared_limit} B limit")
        threads = out["num_warps"] * unit.target.warp
        if threads > unit.target.max_threads:
            problems.append(f"{out['num_warps']} warps x {unit.target.warp} = {threads} threads > "
                            f"{unit.target.max_threads}")
        out["ok"] = not problems
        out["error"] = "; ".join(problems)
    except Exception as exc:  # report every failure, don't stop at the first
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "")
        out["error"] = f"{type(exc).__name__}: {detail.strip()}"[:400]
    out["seconds"] = time.perf_counter() - started
    return out


# --------------------------------------------------------------------------- planning
def load_extra(spec: str) -> list:
    module, _, attr = spec.partition(":")
    return list(getattr(importlib.import_module(module), attr or "KERNELS"))


def plan(args) -> tuple[list[Row], list[str], list[str]]:
    """Rows and units to compile; also notes (skipped backends) and hard errors (plugin failures)."""
    from slipstream.kernels import catalog
    from slipstream.plugins import system

    notes, errors = [], []
    kernels = catalog()
    extra = [k for spec in args.extra_kernels for k in load_extra(spec)]
    everything = [(k, False) for k in kernels] + [(k, True) for k in extra]
    if args.kernel:
        everything = [(k, x) for k, x in everything if k.name in args.kernel or k.op in args.kernel]
        missing = set(args.kernel) - {k.name for k, _ in everything} - {k.op for k, _ in everything}
        if missing:
            errors.append(f"no kernel named {', '.join(sorted(missing))}; known: "
                          f"{', '.join(k.name for k in kernels + extra) or 'none'}")
    plugins = system()
    rows: list[Row] = []
    wanted = args.backend or list(BACKENDS)
    for name in wanted:
        backend = BACKENDS[name]
        if importlib.util.find_spec(backend.module) is None:
            notes.append(f"{name}: not installed, skipped")
            continue
        record = plugins.records.get(name)
        if record is None or record.status != "loaded":
            why = f"{record.status}: {record.error}" if record else "absent"
            errors.append(f"{name}: plugin did not load ({why})")
            continue
        targets = backend.targets()
        if args.target:
            targets = [t for t in targets + backend.optional_targets() if t.name in args.target]
        if not targets:
            if backend.no_targets_reason:
                notes.append(f"{name}: {backend.no_targets_reason}")
            elif args.target:
                notes.append(f"{name}: none of the requested targets")
            continue
        impls = [i for i in plugins.registry.implementations() if i.plugin == name]
        for kernel, is_extra in everything:
            impl = next((i for i in impls if i.fn is kernel.fn), None)
            if impl is None and not is_extra:
                notes.append(f"{name}: does not register {kernel.name}, skipped")
                continue
            for target in targets:
                try:
                    configs = impl.configs_for(target.device) if impl is not None else \
                        list(backend.space(kernel)(target.device)) or [None]
                except Exception as exc:
                    rows.append(Row(name, kernel.name, -1, None, target.name,
                                    error=f"tuning space raised {type(exc).__name__}: {exc}"))
                    continue
                for index, config in enumerate(configs):
                    if args.config and index not in args.config:
                        continue
                    row = Row(name, kernel.name, index, config, target.name)
                    rows.append(row)
                    if kernel.aot is None:
                        row.error = "kernel declares no aot(config): nothing to compile"
                        continue
                    try:
                        units = kernel.aot(dict(config) if config else dict(kernel.configs[0]))
                    except Exception as exc:
                        row.error = f"aot(config) raised {type(exc).__name__}: {exc}"
                        continue
                    for u in units:
                        options = {**u.options, **backend_options(config, target, u.options)}
                        _UNITS.append(Unit(target, u.name, u.fn, dict(u.signature), dict(u.constexprs),
                                           options))
                        row.units.append(len(_UNITS) - 1)
    return rows, notes, errors


# --------------------------------------------------------------------------- main
def _progress(args, done: int, total: int, started: float) -> None:
    if args.progress and (done % 25 == 0 or done == total):
        elapsed = time.perf_counter() - started
        print(f"  {done}/{total} compiled, {elapsed:.0f} s", file=sys.stderr, flush=True)


def run(args) -> int:
    started = time.perf_counter()
    cache = None
    if not args.cache_dir:
        cache = tempfile.TemporaryDirectory(prefix="slipstream-matrix-")
        os.environ["TRITON_CACHE_DIR"] = cache.name
    else:
        os.environ["TRITON_CACHE_DIR"] = args.cache_dir
    rows, notes, errors = plan(args)
    # Dedupe identical compilations (same unit on the same target under several configs).
    first: dict[tuple, int] = {}
    alias = []
    for i, unit in enumerate(_UNITS):
        alias.append(first.setdefault(unit.key(), i))
    todo = sorted(set(alias))
    if args.dry_run:
        per_target: dict[str, int] = {}
        for i in todo:
            per_target[_UNITS[i].target.name] = per_target.get(_UNITS[i].target.name, 0) + 1
        print(f"dry run: {len(rows)} rows, {len(_UNITS)} units, {len(todo)} unique compilations: "
              + ", ".join(f"{t} {n}" for t, n in sorted(per_target.items())))
        for note in notes:
            print(f"note: {note}")
        for err in errors:
            print(f"ERROR: {err}")
        return 1 if errors else 0
    results: dict[int, dict] = {}
    if todo:
        if args.jobs > 1 and len(todo) > 1:
            import multiprocessing

            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
                for i, res in zip(todo, pool.map(compile_one, todo, chunksize=1), strict=True):
                    results[i] = res
                    _progress(args, len(results), len(todo), started)
        else:
            for i in todo:
                results[i] = compile_one(i)
                _progress(args, len(results), len(todo), started)
    compiled_s = time.perf_counter() - started
    import resource

    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu_s = sum(u.ru_utime + u.ru_stime for u in usage)

    failures = []
    table = []
    for row in rows:
        res = [results[alias[u]] for u in row.units]
        bad = [(_UNITS[u].name, r["error"]) for u, r in zip(row.units, res, strict=True) if not r["ok"]]
        if row.error:
            bad.insert(0, ("-", row.error))
        ok = not bad
        shared = max((r["shared"] for r in res), default=0)
        regs = max((r["registers"] for r in res), default=-1)
        spills = max((r["spills"] for r in res), default=-1)
        table.append({"backend": row.backend, "kernel": row.kernel, "config_index": row.config_index,
                      "config": row.config, "target": row.target, "ok": ok, "shared_bytes": shared,
                      "registers": regs, "spills": spills,
                      "units": [{"unit": _UNITS[u].name, **{k: v for k, v in r.items()}}
                                for u, r in zip(row.units, res, strict=True)],
                      "errors": [f"{n}: {e}" for n, e in bad]})
        for unit_name, err in bad:
            failures.append(f"FAIL kernel={row.kernel} config[{row.config_index}]={config_label(row.config)} "
                            f"target={row.target} ({row.backend}) unit={unit_name}: {err}")

    print(f"{'kernel':<22} {'cfg':>3} {'target':<8} {'ok':<4} {'shared':>7} {'regs':>5} {'spills':>6}  "
          "config")
    for t in table:
        regs = "?" if t["registers"] < 0 else str(t["registers"])
        spills = "?" if t["spills"] < 0 else str(t["spills"])
        print(f"{t['kernel']:<22} {t['config_index']:>3} {t['target']:<8} {'ok' if t['ok'] else 'FAIL':<4} "
              f"{t['shared_bytes']:>7} {regs:>5} {spills:>6}  {config_label(t['config'])}")
    for note in notes:
        print(f"note: {note}")
    for err in errors:
        print(f"ERROR: {err}")
    for f in failures:
        print(f)
    n_units = len(_UNITS)
    summary = (f"compile matrix: {len(table)} kernel x config x target rows, {n_units} units "
               f"({len(todo)} compiled, {n_units - len(todo)} deduplicated), "
               f"{sum(not t['ok'] for t in table)} failed rows, {len(errors)} errors, "
               f"{compiled_s:.1f} s wall / {cpu_s:.0f} s CPU with {args.jobs} jobs")
    print(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rows": table, "notes": notes, "errors": errors,
                       "seconds": compiled_s, "cpu_seconds": cpu_s, "jobs": args.jobs}, f, indent=1,
                      default=str)
    if cache is not None:
        cache.cleanup()
    if not table and not errors:
        print("nothing compiled (no kernel / target matched the filters)")
    return 1 if failures or errors else 0


def parse(argv: Sequence[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", action="append", choices=sorted(BACKENDS),
                   help="only this backend (repeatable)")
    p.add_argument("--target", action="append", help="only this target, e.g. sm_90, gfx942 (repeatable; "
                   "also reaches optional targets such as gfx950)")
    p.add_argument("--kernel", action="append", help="only this kernel name or op (repeatable)")
    p.add_argument("--config", action="append", type=int, help="only the config at this index (repeatable)")
    p.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    p.add_argument("--json", help="write every row and unit result here")
    p.add_argument("--dry-run", action="store_true", help="plan only: count rows and unique compilations")
    p.add_argument("--progress", action="store_true", help="report progress on stderr")
    p.add_argument("--extra-kernels", action="append", default=[],
                   help="MODULE[:ATTR] with a list of PortableKernel to compile too (default ATTR: KERNELS)")
    p.add_argument("--cache-dir", help="Triton cache to use (default: a fresh temporary one: cold runs)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.jobs < 1:
        print("--jobs must be >= 1", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
