"""Dispatch: run each op with the fastest implementation verified for the call's signature."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from slipstream.dispatch.dispatcher import Dispatcher, DispatchError
from slipstream.dispatch.trace import CandidateReport, Decision

_DISPATCHER = Dispatcher()


def dispatcher() -> Dispatcher:
    return _DISPATCHER


call = _DISPATCHER.call


def explain(op: str | None = None) -> list[Decision]:
    """Decision traces made in this process (every candidate, accepted or rejected and why, times)."""
    return _DISPATCHER.decisions(op)


def force(op: str, implementation: str | None) -> None:
    """Always run ``implementation`` (a name or ``name[config]`` label) for ``op``; ``None`` undoes it."""
    _DISPATCHER.force(op, implementation)


@contextmanager
def forced(op: str, implementation: str) -> Iterator[None]:
    """Context manager form of :func:`force`."""
    previous = _DISPATCHER._forced.get(op)
    _DISPATCHER.force(op, implementation)
    try:
        yield
    finally:
        _DISPATCHER.force(op, previous)


def set_tuning(enabled: bool | None) -> None:
    """Turn verification + timing on or off for every device (``None``: default, on for GPUs)."""
    _DISPATCHER.set_tuning(enabled)


__all__ = ["CandidateReport", "Decision", "DispatchError", "Dispatcher", "call", "dispatcher", "explain", "force",
           "forced", "set_tuning"]
