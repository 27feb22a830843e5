"""Implementation records, and the registry that validates them as plugins add them.

An :class:`Implementation` is one way to run an op: a callable with the op's signature, a
predicate over devices, a predicate over inputs and an optional tuning space (a list of configs,
each a separate candidate). Registration refuses what can never be right: an unknown op, a
signature that differs from the reference's, a duplicate name.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from slipstream.device import DeviceInfo

KINDS = ("vendor", "portable", "reference")
KIND_RANK = {"vendor": 0, "portable": 1, "reference": 2}

Config = dict[str, Any]


class RegistrationError(ValueError):
    """An implementation that can't be registered; the message says why and what to fix."""


@dataclass(frozen=True)
class Implementation:
    """One registered way to run an op.

    Attributes:
        op: the op's name.
        name: unique, dotted, prefixed by the plugin (``"nvidia.rms_norm"``).
        fn: callable with the op's positional parameters (and ``config=`` when configs are given).
        devices: ``devices(info) -> bool``: which devices it may run on.
        accepts: ``accepts(*args) -> bool``: which inputs it handles (dtypes, shapes, flags).
        configs: tuning space: a list of configs, or ``configs(info) -> list`` per device.
        kind: ``"vendor"``, ``"portable"`` or ``"reference"``; the static order when tuning is off.
        priority: tie-break within a kind when tuning is off (higher first).
        plugin: name of the plugin that registered it.
        description: one line for ``doctor`` and ``explain``.
    """

    op: str
    name: str
    fn: Callable
    devices: Callable[[DeviceInfo], bool]
    accepts: Callable[..., bool]
    configs: Sequence[Config] | Callable[[DeviceInfo], Sequence[Config]] | None = None
    kind: str = "portable"
    priority: int = 0
    plugin: str = ""
    description: str = ""
    extra_configs: tuple[Callable[[DeviceInfo], Sequence[Config]], ...] = field(default=(), compare=False)

    def configs_for(self, info: DeviceInfo) -> list[Config | None]:
        """The tuning space on ``info``: ``[None]`` when the implementation takes no config."""
        if self.configs is None and not self.extra_configs:
            return [None]
        base = self.configs(info) if callable(self.configs) else list(self.configs or [])
        for more in self.extra_configs:
            base += list(more(info) or [])
        return list(base) or [None]

    def bound(self, config: Config | None) -> Callable:
        return self.fn if config is None else functools.partial(self.fn, config=config)


@dataclass(frozen=True)
class Candidate:
    """An implementation with one of its configs: what the dispatcher verifies and times."""

    impl: Implementation
    config: Config | None

    @property
    def label(self) -> str:
        if self.config is None:
            return self.impl.name
        inside = ",".join(f"{k}={v}" for k, v in sorted(self.config.items()))
        return f"{self.impl.name}[{inside}]"

    def function(self) -> Callable:
        return self.impl.bound(self.config)


def _always(*_: object, **__: object) -> bool:
    return True


def check_signature(op_params: Sequence[str], fn: Callable, *, wants_config: bool, name: str) -> None:
    """``fn`` must take the op's parameters, same names, same order (plus ``config`` if tuned)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as exc:
        raise RegistrationError(f"{name}: cannot read the signature of {fn!r}: {exc}") from None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if tuple(positional[: len(op_params)]) != tuple(op_params):
        raise RegistrationError(
            f"{name}: signature ({', '.join(positional)}) does not match the op's ({', '.join(op_params)}); "
            "implementations take the reference's parameters in the same order"
        )
    extra = [p for p in params[len(op_params):] if p.name != "config" and p.default is p.empty
             and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if extra:
        raise RegistrationError(f"{name}: extra parameters without defaults: {[p.name for p in extra]}")
    if wants_config and not any(p.name == "config" or p.kind == p.VAR_KEYWORD for p in params):
        raise RegistrationError(f"{name}: registered with configs but `fn` has no `config` parameter")


class Registry:
    """All implementations, per op. Plugins receive one (or a staging view of one) to add to."""

    def __init__(self, op_params: dict[str, tuple[str, ...]]):
        self._op_params = dict(op_params)
        self._impls: dict[str, dict[str, Implementation]] = {op: {} for op in op_params}
        self._plugin = ""
        self._parent: Registry | None = None

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(self._op_params)

    def add(
        self,
        op: str,
        name: str,
        fn: Callable,
        *,
        devices: Callable[[DeviceInfo], bool] | None = None,
        accepts: Callable[..., bool] | None = None,
        configs: Sequence[Config] | Callable[[DeviceInfo], Sequence[Config]] | None = None,
        kind: str = "portable",
        priority: int = 0,
        description: str = "",
    ) -> Implementation:
        """Register ``fn`` as implementation ``name`` of ``op``; see :class:`Implementation`."""
        if op not in self._op_params:
            raise RegistrationError(f"{name}: unknown op {op!r}; known ops: {', '.join(self._op_params)}")
        if not isinstance(name, str) or not name or " " in name:
            raise RegistrationError(f"implementation names are non-empty strings without spaces, got {name!r}")
        if not callable(fn):
            raise RegistrationError(f"{name}: `fn` must be callable, got {type(fn).__name__}")
        if kind not in KINDS:
            raise RegistrationError(f"{name}: kind must be one of {KINDS}, got {kind!r}")
        for pred_name, pred in (("devices", devices), ("accepts", accepts)):
            if pred is not None and not callable(pred):
                raise RegistrationError(f"{name}: `{pred_name}` must be callable")
        if configs is not None and not callable(configs):
            configs = [dict(c) for c in configs]
            if not all(isinstance(c, dict) for c in configs):
                raise RegistrationError(f"{name}: every config must be a dict")
        check_signature(self._op_params[op], fn, wants_config=configs is not None, name=name)
        existing = self.find(name) or (self._parent.find(name) if self._parent is not None else None)
        if existing is not None:
            raise RegistrationError(f"{name}: an implementation of that name is already registered "
                                    f"(by {existing.plugin or 'core'})")
        impl = Implementation(op=op, name=name, fn=fn, devices=devices or _always, accepts=accepts or _always,
                              configs=configs, kind=kind, priority=priority, plugin=self._plugin,
                              description=description or (fn.__doc__ or "").strip().split("\n")[0])
        self._impls[op][name] = impl
        return impl

    def add_configs(self, name: str, configs: Callable[[DeviceInfo], Sequence[Config]]) -> None:
        """Extend implementation ``name``'s tuning space (the ``slipstream_tuning_space`` hook)."""
        impl = self.find(name)
        if impl is None:
            raise RegistrationError(f"tuning space for unknown implementation {name!r}")
        if impl.configs is None:
            raise RegistrationError(f"{name} takes no config; it can't be given a tuning space")
        self._impls[impl.op][name] = Implementation(
            **{**impl.__dict__, "extra_configs": (*impl.extra_configs, configs)})

    def find(self, name: str) -> Implementation | None:
        for impls in self._impls.values():
            if name in impls:
                return impls[name]
        return None

    def implementations(self, op: str | None = None) -> list[Implementation]:
        ops: Iterable[str] = self._impls if op is None else (op,)
        return [impl for o in ops for impl in self._impls.get(o, {}).values()]

    def remove_plugin(self, plugin: str) -> None:
        for impls in self._impls.values():
            for name in [n for n, i in impls.items() if i.plugin == plugin]:
                del impls[name]

    def staging(self, plugin: str) -> Registry:
        """A registry that records additions as coming from ``plugin``, to commit or discard whole."""
        stage = Registry(self._op_params)
        stage._plugin = plugin
        stage._parent = self
        return stage

    def merge(self, other: Registry) -> None:
        for op, impls in other._impls.items():
            for name, impl in impls.items():
                if self.find(name) is not None:
                    raise RegistrationError(f"{name}: already registered by {self.find(name).plugin or 'core'}")
                self._impls[op][name] = impl


def static_order(impls: Iterable[Implementation]) -> list[Implementation]:
    """The no-tuning preference: vendor > portable > reference, then priority, then name."""
    return sorted(impls, key=lambda i: (KIND_RANK[i.kind], -i.priority, i.name))
