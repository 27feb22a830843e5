"""What holds device memory at a step's peak: reads a ``torch.cuda.memory._snapshot()`` pickle.

``w8b.py --memory-snapshot PATH`` records the allocator's history over the warm-up steps (tuning,
graph captures, first replays) and one timed step and writes it to ``PATH``. This script replays
the recorded allocations and frees and prints, for the default pool and for each private (CUDA
graph) pool: the peak of live bytes, the segments reserved at the end, and the live allocations at
the peak grouped by the first frame in slipstream / transformers / peft code (the site that asked).
The peak a step really needs with graphs is the default pool's peak plus the graph pools' reserved
bytes (replays never ask the allocator).

    python benchmarks/train/memory_breakdown.py snapshot.pickle [--top 25]
"""

from __future__ import annotations

import argparse
import pickle
from collections import defaultdict

OURS = ("slipstream", "transformers", "peft")


def site(frames: list[dict]) -> str:
    """The innermost two frames (in different files) in slipstream, transformers or peft code."""
    found: list[str] = []
    for f in frames or []:
        name = f.get("filename", "")
        if any(f"/{pkg}/" in name for pkg in OURS):
            short = name.split("/site-packages/")[-1].split("/core/")[-1]
            if not found or not found[-1].startswith(short + ":"):
                found.append(f"{short}:{f.get('line')} {f.get('name')}")
            if len(found) == 2:
                break
    return " < ".join(found) or "(no slipstream/transformers/peft frame)"


def pool_of(addr: int, ranges: list[tuple[int, int, tuple]]) -> tuple:
    for start, end, pool in ranges:
        if start <= addr < end:
            return pool
    return (0, 0)


MARKER = "_memory_marker"  # w8b.py allocates a tiny tensor in a function of this name between steps


def analyse(snapshot: dict, top: int = 25, exclude: str = "") -> str:
    """The report: per window between markers (steps) and per pool, the live peak and who holds it.
    ``exclude``: leave out allocations whose site contains this text (the peak of everything else)."""
    segments = snapshot.get("segments", [])
    ranges = [(s["address"], s["address"] + s["total_size"], tuple(s.get("segment_pool_id", (0, 0))))
              for s in segments]
    reserved: dict[tuple, int] = defaultdict(int)
    for start, end, pool in ranges:
        reserved[pool] += end - start
    traces = snapshot.get("device_traces", [[]])
    events = max(traces, key=len) if traces else []
    if exclude:
        events = _without(events, exclude)
    counts: dict[str, int] = defaultdict(int)
    for e in events:
        counts[e.get("action")] += 1
    peaks = _peaks(events, ranges)  # (window, pool) -> (bytes, event index)
    lines = [f"events: {len(events)} ({dict(counts)})", ""]
    for (window, pool), (peak, index) in sorted(peaks.items()):
        kind = "default pool" if pool == (0, 0) else f"private pool {pool}"
        lines.append(f"== window {window}, {kind}: live peak {peak / 2**20:,.0f} MiB at event {index}; "
                     f"reserved at the end {reserved.get(pool, 0) / 2**20:,.0f} MiB")
        by_site: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for size, where, p in _live_at(events, ranges, index).values():
            if p == pool:
                by_site[where][0] += size
                by_site[where][1] += 1
        for where, (size, n) in sorted(by_site.items(), key=lambda kv: -kv[1][0])[:top]:
            lines.append(f"  {size / 2**20:9,.1f} MiB  x{n:<4d} {where}")
        lines.append("")
    private = sum(v for k, v in reserved.items() if k != (0, 0))
    last = max((w for w, _ in peaks), default=0)
    default_last = peaks.get((last, (0, 0)), (0, 0))[0]
    lines.append(f"last window: default-pool live peak {default_last / 2**30:.3f} GiB + private pools reserved "
                 f"{private / 2**30:.3f} GiB = {(default_last + private) / 2**30:.3f} GiB")
    return "\n".join(lines)


def _without(events: list[dict], exclude: str) -> list[dict]:
    """``events`` less the allocations (and their frees) whose site contains ``exclude``."""
    kept, hidden = [], set()
    for e in events:
        addr = e.get("addr")
        if e.get("action") == "alloc" and exclude in site(e.get("frames", [])):
            hidden.add(addr)
        elif e.get("action") in ("free_requested", "free_completed") and addr in hidden:
            if e.get("action") == "free_completed":
                hidden.discard(addr)
        else:
            kept.append(e)
    return kept


def _is_marker(e: dict) -> bool:
    return e.get("action") == "alloc" and any(f.get("name") == MARKER for f in e.get("frames") or [])


def _peaks(events: list[dict], ranges: list) -> dict:
    live: dict[int, tuple[int, tuple]] = {}
    totals: dict[tuple, int] = defaultdict(int)
    peaks: dict[tuple, tuple[int, int]] = {}
    window = 0
    for i, e in enumerate(events):
        action, addr = e.get("action"), e.get("addr")
        if _is_marker(e):
            window += 1
        if action == "alloc":
            pool = pool_of(addr, ranges)
            live[addr] = (e["size"], pool)
            totals[pool] += e["size"]
            if totals[pool] > peaks.get((window, pool), (0, 0))[0]:
                peaks[(window, pool)] = (totals[pool], i)
        elif action == "free_requested" and addr in live:
            size, pool = live.pop(addr)
            totals[pool] -= size
    return peaks


def _live_at(events: list[dict], ranges: list, index: int) -> dict[int, tuple[int, str, tuple]]:
    live: dict[int, tuple[int, str, tuple]] = {}
    for e in events[: index + 1]:
        action, addr = e.get("action"), e.get("addr")
        if action == "alloc":
            live[addr] = (e["size"], site(e.get("frames", [])), pool_of(addr, ranges))
        elif action == "free_requested":
            live.pop(addr, None)
    return live


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("snapshot")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--exclude", default="", help="leave out allocations whose site contains this text")
    a = ap.parse_args()
    with open(a.snapshot, "rb") as f:
        print(analyse(pickle.load(f), a.top, a.exclude))


if __name__ == "__main__":
    main()
