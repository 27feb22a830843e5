"""Decision traces: what the dispatcher considered for one call signature, and why it chose."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


@dataclass
class CandidateReport:
    """One candidate's fate. ``status``: chosen, accepted, rejected or skipped."""

    label: str
    plugin: str
    kind: str
    status: str
    reason: str = ""
    time_ms: float | None = None
    errors: dict[str, float] = field(default_factory=dict)


@dataclass
class Decision:
    """How one (op, device, dtypes, shape bucket, flags) key was decided.

    ``mode``: ``tuned`` (verified and timed), ``cached`` (a tuned decision read from disk),
    ``static`` (tuning off: first candidate in vendor > portable > reference order that passes
    verification), ``forced`` (by ``slipstream.force`` or ``SLIPSTREAM_FORCE``), or ``fallback``
    (the chosen implementation raised at run time and was replaced).
    """

    op: str
    key: str
    device: str
    mode: str
    chosen: str
    shapes: str = ""
    candidates: list[CandidateReport] = field(default_factory=list)
    seconds: float = 0.0
    created: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Decision:
        cands = [CandidateReport(**c) for c in data.get("candidates", [])]
        return cls(**{**data, "candidates": cands})

    def format(self) -> str:
        lines = [f"{self.op}  [{self.shapes}]  on {self.device}  ({self.mode}"
                 f"{f', {self.seconds:.2f} s' if self.seconds else ''})  -> {self.chosen}"]
        width = max([len(c.label) for c in self.candidates] + [10])
        for c in self.candidates:
            t = f"{c.time_ms:9.4f} ms" if c.time_ms is not None else " " * 12
            mark = {"chosen": "*", "accepted": "+", "rejected": "x", "skipped": "-"}.get(c.status, "?")
            lines.append(f"  {mark} {c.label:<{width}}  {c.status:<8} {t}  {c.reason}")
        return "\n".join(lines)
