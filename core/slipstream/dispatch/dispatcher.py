"""Choosing an implementation per call signature: filter, verify, time, remember.

The hot path is :meth:`Dispatcher.call`: validate the arguments into a key, look the key up,
call. Everything else runs once per key (op, device, dtypes, exact feature dims, bucketed row
count, flags): the candidates whose device and input predicates accept the call are verified
against the reference on fresh random inputs of the call's shape (bounded in size), timed on
inputs of the call's full shape, and the fastest correct one is kept, in memory and on disk.
"""

from __future__ import annotations

import contextvars
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

import torch
import torch.utils.checkpoint

from slipstream.device import DeviceInfo, device_info
from slipstream.dispatch.cache import DecisionCache
from slipstream.dispatch.graph_timing import GraphCaptureError, graph_iters, graph_ms
from slipstream.dispatch.timing import median_ms, synchronize
from slipstream.dispatch.trace import CandidateReport, Decision
from slipstream.dispatch.verify import Oracle, grad_targets, random_grad_outputs, run
from slipstream.ops._spec import OpSpec
from slipstream.registry import Candidate, Implementation, static_order

# Exceptions that are control flow, not failures: non-reentrant checkpointing stops recomputation
# early by raising through the ops; a kernel must not be blamed (and demoted) for that.
_CONTROL_FLOW: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(torch.utils.checkpoint, "_StopRecomputationError", None),) if t is not None)

# Verification inputs are bounded so verifying costs milliseconds, not seconds.
VERIFY_ELEMENTS = {"cpu": 1 << 16}
VERIFY_ELEMENTS_DEFAULT = 1 << 22
# Timing rounds per candidate when tuning (best of the rounds' medians). On the H100 single rounds
# ranked the same config 2x apart from one candidate to the next (clock ramps after compiles).
TIMING_ROUNDS = {"cpu": 1}
TIMING_ROUNDS_DEFAULT = 2


def timing_method(device: torch.device) -> str:
    """How the tuner times candidates: ``"graph"`` (GPU time replayed from a CUDA graph, no host
    overhead; the default on CUDA) or ``"events"`` (events or a synchronised clock around each call:
    host time included where the host is the bottleneck; every other device, or
    ``SLIPSTREAM_TIMING=events``).

    Why graphs by default: on the H100 event timing of a 0.36 ms GEMM read 0.43 and 0.71 ms in two
    rounds (host noise), and the tuner picked a LoRA implementation 1.54x the base GEMM over the cuBLAS
    path at 1.36x; ranked by graph time it picked the cuBLAS path (1.37x in that run;
    benchmarks/results/h100-2026-11-23-s4/)."""
    wanted = os.environ.get("SLIPSTREAM_TIMING", "graph").strip().lower() or "graph"
    if wanted not in ("events", "graph"):
        raise ValueError(f"SLIPSTREAM_TIMING must be 'events' or 'graph', got {wanted!r}")
    return "graph" if wanted == "graph" and device.type == "cuda" else "events"


GRAPH_REPLAYS, GRAPH_BUDGET_MS = 5, 25.0  # per candidate and round: about 5 ms of GPU work per replay


def graph_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """GPU ms of ``fn()`` by CUDA-graph replay, with enough calls per graph for ~5 ms of GPU work."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    once_ms = (time.perf_counter() - t0) * 1000  # an upper bound on the GPU time: sets the calls per graph
    iters = graph_iters(once_ms, GRAPH_BUDGET_MS, GRAPH_REPLAYS)
    ms = graph_ms(fn, device, iters_per_graph=iters, replays=GRAPH_REPLAYS)
    if ms is None:  # not CUDA: the caller asked for graphs where there are none
        raise GraphCaptureError(f"CUDA graphs need a CUDA device, not {device}")
    return ms


def _time_rounds(passing: list, rounds: int, timer: Callable, spec: OpSpec, args: tuple, grad_outs) -> None:
    """Interleaved rounds (alternating order) of ``timer`` over the passing candidates, keeping each
    one's best. A candidate that runs out of memory or raises is rejected; a
    :class:`GraphCaptureError` propagates (the caller falls back to events for every candidate)."""
    for round_ in range(rounds):
        for _cand, fn, report in (passing if round_ % 2 == 0 else passing[::-1]):
            if report.status == "rejected":
                continue
            try:
                ms = timer(lambda fn=fn: run(fn, spec, args, grad_outs))
            except GraphCaptureError:
                raise
            except torch.OutOfMemoryError:
                report.status, report.reason = "rejected", "out of memory while timing"
                continue
            except Exception as exc:
                report.status, report.reason = "rejected", f"raised while timing: {type(exc).__name__}: {exc}"
                continue
            report.time_ms = ms if report.time_ms is None else min(report.time_ms, ms)


class DispatchError(RuntimeError):
    """No implementation could run this call (forced one missing, every candidate rejected)."""


def _flag(name: str) -> bool | None:
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    return None


def _parse_force(raw: str) -> dict[str, str]:
    out = {}
    # Commas inside [...] belong to a config label (nvidia.lora_linear[base=cublas,bytes=4096]).
    parts = re.split(r",(?![^\[]*\])", raw)
    for part in filter(None, (p.strip() for p in parts)):
        op, sep, impl = part.partition("=")
        if not sep or not op.strip() or not impl.strip():
            raise ValueError(f"SLIPSTREAM_FORCE entries look like op=implementation, got {part!r}")
        out[op.strip()] = impl.strip()
    return out


def describe_args(spec: OpSpec, args: tuple) -> str:
    parts = []
    for name, a in zip(spec.parameters, args, strict=False):
        if isinstance(a, torch.Tensor):
            dt = str(a.dtype).removeprefix("torch.")
            parts.append(f"{name}={'x'.join(map(str, a.shape)) or 'scalar'}:{dt}")
        elif hasattr(a, "quant_type") and hasattr(a, "shape"):
            parts.append(f"{name}={'x'.join(map(str, a.shape))}:{a.quant_type}")
    return " ".join(parts)


class Dispatcher:
    """Process-wide: the decision table, the decision traces, and overrides."""

    def __init__(self) -> None:
        self._table: dict[Hashable, Callable] = {}
        self._decisions: dict[Hashable, Decision] = {}
        self._forced: dict[str, str] = {}
        self._tuning: bool | None = None
        self._caches: dict[str, DecisionCache] = {}
        self._lock = threading.RLock()
        self.tuning_seconds = 0.0

    # ------------------------------------------------------------------ hot path
    def call(self, spec: OpSpec, args: tuple) -> object:
        if torch.compiler.is_compiling():
            return spec.reference(*args)  # inductor compiles the op's meaning with the model
        key = spec.check(args)
        fn = self._table.get(key)
        if fn is None:
            fn = self._decide(spec, key, args)
        try:
            return fn(*args)
        except (torch.OutOfMemoryError, *_CONTROL_FLOW) as exc:
            raise exc
        except Exception as exc:
            if fn is spec.reference:
                raise
            return self._fallback(spec, key, args, exc)(*args)

    # ------------------------------------------------------------------ settings
    def forget(self) -> None:
        """Drop in-memory decisions (plugins changed, or an override was set)."""
        with self._lock:
            self._table.clear()
            self._decisions.clear()
            self._caches.clear()

    def force(self, op: str, implementation: str | None) -> None:
        from slipstream.ops import spec

        spec(op)  # unknown op -> KeyError naming the known ones
        with self._lock:
            if implementation is None:
                self._forced.pop(op, None)
            else:
                self._forced[op] = implementation
            self.forget()

    def forced(self, op: str) -> str | None:
        return self._forced.get(op) or _parse_force(os.environ.get("SLIPSTREAM_FORCE", "")).get(op)

    def set_tuning(self, enabled: bool | None) -> None:
        """``True``/``False`` overrides ``SLIPSTREAM_TUNE``; ``None`` restores the default."""
        with self._lock:
            self._tuning = enabled
            self.forget()

    def tuning_enabled(self, info: DeviceInfo) -> bool:
        if self._tuning is not None:
            return self._tuning
        env = _flag("SLIPSTREAM_TUNE")
        return env if env is not None else info.vendor != "cpu"

    def decisions(self, op: str | None = None) -> list[Decision]:
        return [d for d in self._decisions.values() if op is None or d.op == op]

    def cache_for(self, info: DeviceInfo) -> DecisionCache:
        cache = self._caches.get(info.key)
        if cache is None:
            from slipstream import __version__
            from slipstream.plugins import system

            stamp = {"versions": {k: v for k, v in sorted(info.versions.items())}, "slipstream": __version__,
                     "plugins": system().versions()}
            cache = self._caches[info.key] = DecisionCache(info.key, stamp)
        return cache

    # ------------------------------------------------------------------ deciding
    def candidates(self, spec: OpSpec, info: DeviceInfo, args: tuple,
                   reports: list[CandidateReport]) -> list[Candidate]:
        """Implementations whose predicates accept this device and these inputs, one per config."""
        from slipstream.plugins import registry

        found: list[Candidate] = []
        for impl in static_order(registry().implementations(spec.name)):
            verdict = self._admit(impl, info, args)
            if verdict:
                reports.append(CandidateReport(impl.name, impl.plugin, impl.kind, "skipped", verdict))
                continue
            try:
                configs = impl.configs_for(info)
            except Exception as exc:
                reports.append(CandidateReport(impl.name, impl.plugin, impl.kind, "rejected",
                                               f"tuning space raised {type(exc).__name__}: {exc}"))
                continue
            found += [Candidate(impl, c) for c in configs]
        return found

    @staticmethod
    def _admit(impl: Implementation, info: DeviceInfo, args: tuple) -> str:
        try:
            if not impl.devices(info):
                return f"not for {info.vendor} {info.arch or info.type}"
            if not impl.accepts(*args):
                return "does not accept these inputs"
        except Exception as exc:
            return f"predicate raised {type(exc).__name__}: {exc}"
        return ""

    def _decide(self, spec: OpSpec, key: Hashable, args: tuple) -> Callable:
        with self._lock:
            fn = self._table.get(key)
            if fn is not None:
                return fn
            started = time.perf_counter()
            devices = [a.device.index for a in args if isinstance(a, torch.Tensor) and a.device.type == "cuda"]
            with torch.random.fork_rng(devices=devices):  # deciding must not shift the user's random stream
                if _in_backward():
                    decision, fn = _in_clean_context(self._choose, spec, key, args)
                else:
                    decision, fn = _in_clean_thread(self._choose, spec, key, args)
            decision.seconds = time.perf_counter() - started
            self.tuning_seconds += decision.seconds
            self._decisions[key] = decision
            self._table[key] = fn
            return fn

    def _choose(self, spec: OpSpec, key: Hashable, args: tuple) -> tuple[Decision, Callable]:
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        info = device_info(device)
        key_text = self.key_text(key, info)
        reports: list[CandidateReport] = []
        candidates = self.candidates(spec, info, args, reports)
        shapes = describe_args(spec, args)
        forced = self.forced(spec.name)
        if forced:
            match = [c for c in candidates if forced in (c.label, c.impl.name)]
            if not match:
                available = ", ".join(c.label for c in candidates) or "none"
                raise DispatchError(f"{spec.name}: forced implementation {forced!r} is not available for "
                                    f"{shapes} on {info.describe()}; candidates: {available}")
            chosen = match[0]
            reports.append(CandidateReport(chosen.label, chosen.impl.plugin, chosen.impl.kind, "chosen", "forced"))
            return Decision(spec.name, key_text, info.describe(), "forced", chosen.label, shapes, reports), \
                chosen.function()
        if self.tuning_enabled(info):
            cached = self.cache_for(info).get(key_text)
            if cached is not None:
                by_label = {c.label: c for c in candidates}
                chosen = by_label.get(cached.get("chosen", ""))
                if chosen is not None:
                    decision = Decision.from_json(cached)
                    decision.mode = "cached"
                    return decision, chosen.function()
            return self._tune(spec, key_text, info, args, candidates, reports, shapes)
        return self._static(spec, key_text, info, args, candidates, reports, shapes)

    def _oracle(self, spec: OpSpec, args: tuple, info: DeviceInfo) -> Oracle:
        budget = VERIFY_ELEMENTS.get(info.type, VERIFY_ELEMENTS_DEFAULT)
        with torch.inference_mode(False), torch.enable_grad(), _no_autocast(info.type):
            return Oracle(spec, spec.fresh(args, budget))

    def _static(self, spec, key_text, info, args, candidates, reports, shapes) -> tuple[Decision, Callable]:
        """Tuning off: the first candidate in static order that passes verification."""
        oracle = None
        for cand in candidates:
            if cand.impl.fn is spec.reference:
                reports.append(CandidateReport(cand.label, cand.impl.plugin, cand.impl.kind, "chosen",
                                               "the op's reference"))
                return Decision(spec.name, key_text, info.describe(), "static", cand.label, shapes, reports), \
                    cand.function()
            oracle = oracle or self._oracle(spec, args, info)
            with torch.inference_mode(False), torch.enable_grad(), _no_autocast(info.type):
                verdict = oracle.judge(cand.function())
            if verdict.ok:
                reports.append(CandidateReport(cand.label, cand.impl.plugin, cand.impl.kind, "chosen",
                                               "first in static order to pass verification", errors=verdict.errors))
                return Decision(spec.name, key_text, info.describe(), "static", cand.label, shapes, reports), \
                    cand.function()
            reports.append(CandidateReport(cand.label, cand.impl.plugin, cand.impl.kind, "rejected", verdict.reason,
                                           errors=verdict.errors))
        raise DispatchError(f"{spec.name}: no implementation accepts {shapes} on {info.describe()}")

    def _tune(self, spec, key_text, info, args, candidates, reports, shapes) -> tuple[Decision, Callable]:
        progress(f"tuning {spec.name} [{shapes}] on {info.name or info.type}: {len(candidates)} candidates")
        oracle = self._oracle(spec, args, info)
        with torch.inference_mode(False), torch.enable_grad(), _no_autocast(info.type):
            timing_args = self._timing_inputs(spec, args)
            grad_outs = None
            if grad_targets(spec, timing_args):
                probe = run(spec.reference, spec, timing_args, None).outputs
                grad_outs = random_grad_outputs(probe)
            # Verify everything first (this also compiles each candidate), then time the survivors in
            # interleaved rounds (alternating order) keeping each one's best median: a candidate timed
            # right after a compile pause, or during a clock ramp, is not penalised for it.
            passing: list[tuple[Candidate, Callable, CandidateReport]] = []
            for cand in candidates:
                fn = cand.function()
                report = CandidateReport(cand.label, cand.impl.plugin, cand.impl.kind, "accepted")
                reports.append(report)
                if fn is not spec.reference:
                    verdict = oracle.judge(fn)
                    report.errors = verdict.errors
                    if not verdict.ok:
                        report.status, report.reason = "rejected", verdict.reason
                        continue
                passing.append((cand, fn, report))
            where = args[0].device if isinstance(args[0], torch.Tensor) else info.torch_device
            rounds = TIMING_ROUNDS.get(info.type, TIMING_ROUNDS_DEFAULT) if len(passing) > 1 else 1
            method = timing_method(where)
            if method == "graph":
                try:
                    _time_rounds(passing, rounds, lambda f: graph_call_ms(f, where), spec, timing_args, grad_outs)
                except GraphCaptureError as exc:  # one candidate can't be captured: time all of them with events
                    progress(f"  CUDA-graph timing failed ({exc}); timing every candidate with events")
                    for _cand, _fn, report in passing:  # all passed verification: any rejection came from timing
                        report.status, report.reason, report.time_ms = "accepted", "", None
                    method = "events"
            if method == "events":
                _time_rounds(passing, rounds, lambda f: median_ms(f, where), spec, timing_args, grad_outs)
            best: tuple[float, Candidate, CandidateReport] | None = None
            for cand, _fn, report in passing:
                if report.status != "rejected" and (best is None or report.time_ms < best[0]):
                    best = (report.time_ms, cand, report)
        if best is None:
            raise DispatchError(f"{spec.name}: every candidate was rejected for {shapes} on {info.describe()}:\n"
                                + "\n".join(f"  {r.label}: {r.reason}" for r in reports))
        best[2].status = "chosen"
        ref_time = next((r.time_ms for r in reports if r.kind == "reference" and r.time_ms), None)
        best[2].reason = "fastest correct" + (f", {ref_time / best[0]:.2f}x the reference" if ref_time else "")
        if method == "graph":
            best[2].reason += " (GPU time, CUDA graph)"
        decision = Decision(spec.name, key_text, info.describe(), "tuned", best[1].label, shapes, reports)
        try:
            self.cache_for(info).put(key_text, decision.to_json())
        except OSError as exc:
            warnings.warn(f"slipstream: could not save the tuning decision: {exc}", RuntimeWarning, stacklevel=2)
        progress(f"  {spec.name}: chose {best[1].label} ({best[0]:.4f} ms)")
        return decision, best[1].function()

    @staticmethod
    def _timing_inputs(spec: OpSpec, args: tuple) -> tuple:
        """Fresh random inputs at the call's full size (timings depend on size)."""
        return spec.fresh(args, None)

    def _fallback(self, spec: OpSpec, key: Hashable, args: tuple, exc: Exception) -> Callable:
        """The chosen implementation raised at run time: report it, run the reference instead."""
        from slipstream.plugins import strict_mode

        decision = self._decisions.get(key)
        culprit = decision.chosen if decision else "?"
        if strict_mode():
            raise exc
        warnings.warn(f"slipstream: {spec.name} implementation {culprit} raised {type(exc).__name__}: {exc}; "
                      "using the reference for these inputs from now on", RuntimeWarning, stacklevel=3)
        with self._lock:
            self._table[key] = spec.reference
            if decision is not None:
                decision.mode, decision.chosen = "fallback", "reference"
                decision.candidates.append(CandidateReport(culprit, "", "", "rejected",
                                                           f"raised at run time: {type(exc).__name__}: {exc}"))
        return spec.reference

    @staticmethod
    def key_text(key: Hashable, info: DeviceInfo) -> str:
        parts = [info.key if isinstance(p, torch.device) else str(p).removeprefix("torch.") for p in key]
        return "|".join(parts)


def _in_clean_thread(fn: Callable, *args: object) -> object:
    """Run ``fn`` on a fresh thread and return its result (re-raising its exception).

    Deciding runs extra forward/backward passes. Autograd's saved-tensor hooks (activation
    checkpointing, offloading), grad mode, autocast and dispatch modes are thread-local, so a
    fresh thread keeps those passes invisible to whatever context the training step is in.
    """
    result: list[object] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn(*args))
        except BaseException as exc:  # re-raised on the caller's thread
            error.append(exc)

    worker = threading.Thread(target=target, name="slipstream-tune", daemon=True)
    worker.start()
    worker.join()
    if error:
        raise error[0]
    return result[0]


def _in_backward() -> bool:
    """Whether this thread is running an autograd backward (e.g. a checkpointed layer's recompute)."""
    return torch._C._current_graph_task_id() != -1


def _in_clean_context(fn: Callable, *args: object) -> object:
    """Run ``fn`` on this thread in an empty :mod:`contextvars` context: the decision for an op first
    met inside a backward (an offloaded layer's recompute runs its forward with grad there for the
    first time).

    A fresh thread would deadlock there: the autograd engine runs CUDA backward work on its own
    device thread, which is this one, now blocked waiting for the fresh thread, whose verification
    backward is queued on it. A reentrant backward on this thread runs inline instead. What the fresh
    thread guaranteed still holds: hints and other context variables start empty, verification sets
    its own grad mode and turns autocast off, and identity saved-tensor hooks stacked on top keep
    whatever hooks are active here (lean activations, a checkpoint's recompute) out of the tuner's
    own forward and backward passes.
    """
    with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
        return contextvars.Context().run(fn, *args)


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


@contextmanager
def _no_autocast(device_type: str) -> Iterator[None]:
    try:
        ctx = torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:
        yield
        return
    with ctx:
        yield


def progress(message: str) -> None:
    if _flag("SLIPSTREAM_QUIET"):
        return
    print(f"slipstream: {message}", file=sys.stderr, flush=True)
