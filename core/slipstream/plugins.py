"""The plugin API: pluggy hookspecs, and loading backends in isolation from entry points.

A backend is any installed distribution with an entry point in the ``slipstream.backends`` group
pointing at a module (or object) with ``@hookimpl`` functions. Each plugin is imported and asked to
register on its own: one that fails to import, raises while registering or registers something
invalid is reported (``slipstream doctor``) and skipped whole; the ops fall back to what remains.
``SLIPSTREAM_STRICT=1`` turns every such failure into an error.

Environment:
    SLIPSTREAM_PLUGINS: comma-separated allow-list of plugin names (default: all installed).
    SLIPSTREAM_DISABLE_PLUGINS: comma-separated deny-list.
    SLIPSTREAM_STRICT: ``1`` to raise on any plugin failure instead of skipping it.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy
import torch

from slipstream.device import DeviceInfo
from slipstream.registry import Config, RegistrationError, Registry

PROJECT = "slipstream"
ENTRY_POINT_GROUP = "slipstream.backends"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class PluginError(RuntimeError):
    """A plugin failed and strict mode is on."""


class Hookspecs:
    """What a backend plugin may implement (every hook is optional)."""

    @hookspec
    def slipstream_register_kernels(self, registry: Registry) -> None:
        """Add implementations with ``registry.add(op, name, fn, devices=..., accepts=..., configs=...)``."""

    @hookspec(firstresult=True)
    def slipstream_detect_device(self, device: torch.device) -> DeviceInfo | None:
        """Describe ``device`` if it is of a kind this plugin brings (a new torch device type)."""

    @hookspec
    def slipstream_devices(self) -> Sequence[DeviceInfo]:
        """Devices of this plugin's kind present on this machine, for ``doctor`` and defaults."""

    @hookspec(firstresult=True)
    def slipstream_status(self) -> str:
        """One line for ``slipstream doctor``: is this plugin's hardware present, and if not, why."""

    @hookspec
    def slipstream_tuning_spaces(self) -> dict[str, Callable[[DeviceInfo], Sequence[Config]]]:
        """Extra configs per implementation name (any plugin's), as functions of the device."""


@dataclass
class PluginRecord:
    """What happened to one plugin: ``status`` is ``loaded``, ``failed`` or ``disabled``."""

    name: str
    status: str
    distribution: str = ""
    version: str = ""
    error: str = ""
    implementations: list[str] = field(default_factory=list)


def _env_list(var: str) -> set[str] | None:
    raw = os.environ.get(var, "").strip()
    return {p.strip() for p in raw.split(",") if p.strip()} if raw else None


def strict_mode() -> bool:
    return os.environ.get("SLIPSTREAM_STRICT", "").strip().lower() in ("1", "true", "yes", "on")


class PluginSystem:
    """The loaded plugins and the registry they filled."""

    def __init__(self) -> None:
        from slipstream.ops import SPECS

        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(Hookspecs)
        self.registry = Registry({name: spec.parameters for name, spec in SPECS.items()})
        self.records: dict[str, PluginRecord] = {}

    # ---------------------------------------------------------------- loading
    def load_builtin(self) -> None:
        from slipstream import reference_backend

        self.add_plugin(reference_backend, "reference", distribution=PROJECT, version=_dist_version(PROJECT))

    def load_entry_points(self) -> None:
        allow, deny = _env_list("SLIPSTREAM_PLUGINS"), _env_list("SLIPSTREAM_DISABLE_PLUGINS")
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else ""
            version = dist.version if dist is not None else ""
            if ep.name in self.records:
                continue
            if (allow is not None and ep.name not in allow and dist_name not in allow) or (
                deny is not None and (ep.name in deny or dist_name in deny)
            ):
                self.records[ep.name] = PluginRecord(ep.name, "disabled", dist_name, version,
                                                     "disabled by SLIPSTREAM_PLUGINS / SLIPSTREAM_DISABLE_PLUGINS")
                continue
            try:
                obj = ep.load()
            except BaseException as exc:  # noqa: BLE001 - isolate anything a plugin import throws
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self._fail(PluginRecord(ep.name, "failed", dist_name, version), f"import failed: {_short(exc)}")
                continue
            self.add_plugin(obj, ep.name, distribution=dist_name, version=version)

    def add_plugin(self, obj: Any, name: str, *, distribution: str = "", version: str = "") -> PluginRecord:
        """Register a plugin object (module or instance) and let it add its implementations.

        Its registrations land in a staging registry and are committed only if all are valid.
        """
        record = PluginRecord(name, "loaded", distribution, version)
        try:
            self.pm.register(obj, name=name)
        except Exception as exc:
            return self._fail(record, f"not a valid plugin: {_short(exc)}")
        stage = self.registry.staging(name)
        try:
            self._hook(name, "slipstream_register_kernels")(registry=stage)
            self.registry.merge(stage)
        except Exception as exc:
            self.pm.unregister(name=name)
            kind = "invalid registration" if isinstance(exc, RegistrationError) else "registration raised"
            return self._fail(record, f"{kind}: {_short(exc)}")
        record.implementations = [i.name for i in stage.implementations()]
        self.records[name] = record
        return record

    def apply_tuning_spaces(self, names: Sequence[str] | None = None) -> None:
        """Ask loaded plugins (all, or ``names``) for extra tuning configs, once each."""
        for name, record in list(self.records.items()):
            wanted = names is None or name in names
            if not wanted or record.status != "loaded" or self.pm.get_plugin(name) is None:
                continue
            try:
                for spaces in self._hook(name, "slipstream_tuning_spaces")():
                    for impl_name, fn in (spaces or {}).items():
                        self.registry.add_configs(impl_name, fn)
            except Exception as exc:
                self._fail(record, f"tuning space rejected: {_short(exc)}")
                self.registry.remove_plugin(name)
                self.pm.unregister(name=name)

    def _hook(self, plugin: str, hook: str) -> Callable:
        others = [p for n, p in self.pm.list_name_plugin() if n != plugin]
        return self.pm.subset_hook_caller(hook, remove_plugins=others)

    def _fail(self, record: PluginRecord, message: str) -> PluginRecord:
        record.status, record.error = "failed", message
        self.records[record.name] = record
        if strict_mode():
            raise PluginError(f"plugin {record.name!r} ({record.distribution or 'no distribution'}): {message}")
        import warnings

        warnings.warn(f"slipstream: plugin {record.name!r} skipped: {message}. Run `slipstream doctor` for "
                      "details; its ops fall back to other implementations.", RuntimeWarning, stacklevel=3)
        return record

    # ---------------------------------------------------------------- queries
    def detect_device(self, device: torch.device) -> DeviceInfo | None:
        try:
            return self.pm.hook.slipstream_detect_device(device=device)
        except Exception as exc:
            if strict_mode():
                raise
            import warnings

            warnings.warn(f"slipstream: a plugin's device detection raised: {_short(exc)}", RuntimeWarning,
                          stacklevel=2)
            return None

    def devices(self) -> list[DeviceInfo]:
        found: list[DeviceInfo] = []
        for name, _ in self.pm.list_name_plugin():
            try:
                for listed in self._hook(name, "slipstream_devices")():
                    found += list(listed or [])
            except Exception as exc:
                if strict_mode():
                    raise
                self.records.setdefault(name, PluginRecord(name, "loaded")).error = f"devices: {_short(exc)}"
        return found

    def status(self, name: str) -> str:
        """The plugin's own status line (``slipstream_status`` hook), or ``""``."""
        if self.pm.get_plugin(name) is None:
            return ""
        try:
            return self._hook(name, "slipstream_status")() or ""
        except Exception as exc:
            return f"status hook raised {_short(exc)}"

    def versions(self) -> dict[str, str]:
        return {n: r.version for n, r in sorted(self.records.items()) if r.status == "loaded"}


def _short(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    at = f" (at {os.path.basename(where[0].filename)}:{where[0].lineno})" if where else ""
    return f"{type(exc).__name__}: {exc}{at}"


def _dist_version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "0+source"


_lock = threading.RLock()
_system: PluginSystem | None = None


def system() -> PluginSystem:
    """The process-wide plugin system, loaded on first use."""
    global _system
    if _system is None:
        with _lock:
            if _system is None:
                fresh = PluginSystem()
                fresh.load_builtin()
                fresh.load_entry_points()
                fresh.apply_tuning_spaces()
                _system = fresh
    return _system


def registry() -> Registry:
    return system().registry


def register_plugin(obj: Any, name: str) -> PluginRecord:
    """Load a plugin object that is not installed as a distribution (notebooks, tests).

    Decisions already made are forgotten so the new implementations get considered.
    """
    record = system().add_plugin(obj, name)
    system().apply_tuning_spaces([name])
    from slipstream.dispatch import dispatcher

    dispatcher().forget()
    return record


def reload() -> PluginSystem:
    """Forget every plugin and decision and load again (after installing a plugin, or in tests)."""
    global _system
    with _lock:
        _system = None
        from slipstream.device import device_info

        device_info.cache_clear()
        from slipstream.dispatch import dispatcher

        dispatcher().forget()
    return system()


def plugin_device_info(device: torch.device) -> DeviceInfo | None:
    return system().detect_device(device)


def plugin_detected_devices() -> list[DeviceInfo]:
    return system().devices()
