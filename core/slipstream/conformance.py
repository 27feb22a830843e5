"""``slipstream conformance PLUGIN``: check every implementation a plugin registers against the references.

For each implementation, each of its configs, each dtype its op supports and each sample input
(small and odd shapes, or Llama-8B shapes with ``size="real"``) that the implementation accepts on
this device: forward and backward are compared with the float64 reference under the op's
tolerance. Vendors run this on their hardware before publishing a plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from slipstream.device import DeviceInfo, device_info
from slipstream.dispatch.verify import Oracle
from slipstream.ops import SPECS, OpSpec
from slipstream.plugins import PluginRecord, system
from slipstream.registry import Implementation


@dataclass(frozen=True)
class Check:
    implementation: str
    config: str
    dtype: str
    sample: str
    ok: bool
    detail: str


def find_plugin(name: str) -> PluginRecord:
    """A plugin by entry-point name (``nvidia``) or distribution name (``slipstream-nvidia``)."""
    records = system().records
    for record in records.values():
        if name in (record.name, record.distribution):
            return record
    known = ", ".join(f"{r.name} ({r.distribution or 'built in'})" for r in records.values())
    raise LookupError(f"no plugin named {name!r}; installed: {known}")


def with_grads(spec: OpSpec, args: tuple) -> tuple:
    return tuple(a.detach().clone().requires_grad_(True)
                 if isinstance(a, torch.Tensor) and a.is_floating_point() and n in spec.differentiable else a
                 for n, a in zip(spec.parameters, args, strict=False))


def check_implementation(impl: Implementation, info: DeviceInfo, size: str = "small",
                         dtypes: tuple[torch.dtype, ...] | None = None) -> Iterator[Check]:
    spec = SPECS[impl.op]
    if not impl.devices(info):
        return
    for dtype in dtypes or spec.dtypes:
        for sample in spec.samples(info.torch_device, dtype, size):
            args = with_grads(spec, sample.args)
            try:
                if not impl.accepts(*args):
                    continue
            except Exception as exc:
                yield Check(impl.name, "-", str(dtype), sample.label, False, f"accepts() raised {exc!r}")
                continue
            oracle = Oracle(spec, args)
            for config in impl.configs_for(info):
                verdict = oracle.judge(impl.bound(config))
                label = "-" if config is None else ",".join(f"{k}={v}" for k, v in sorted(config.items()))
                yield Check(impl.name, label, str(dtype).removeprefix("torch."), sample.label, verdict.ok,
                            verdict.reason or "fwd+bwd within tolerance")


def run(plugin: str, device: torch.device | str | None = None, size: str = "small",
        dtypes: tuple[torch.dtype, ...] | None = None, progress: Callable[[Check], None] | None = None,
        ops: tuple[str, ...] | None = None) -> list[Check]:
    """All checks for ``plugin`` on ``device`` (default: the first accelerator, else the CPU);
    ``ops`` limits them to those ops' implementations."""
    from slipstream.device import default_device

    record = find_plugin(plugin)
    if record.status != "loaded":
        raise LookupError(f"plugin {record.name!r} is {record.status}: {record.error}")
    info = device_info(device or default_device())
    out = []
    for name in record.implementations:
        impl = system().registry.find(name)
        if impl is None or (ops and impl.op not in ops):
            continue
        for check in check_implementation(impl, info, size, dtypes):
            out.append(check)
            if progress:
                progress(check)
    return out


def format_table(checks: list[Check]) -> str:
    if not checks:
        return "(no checks)"
    cols = [("implementation", 14), ("config", 6), ("dtype", 5), ("sample", 6)]
    widths = [max(w, *(len(getattr(c, n if n != "implementation" else "implementation")) for c in checks))
              for n, w in cols]
    head = "  ".join(n.ljust(w) for (n, _), w in zip(cols, widths, strict=True)) + "  result"
    lines = [head, "-" * len(head)]
    for c in checks:
        cells = [c.implementation, c.config, c.dtype, c.sample]
        lines.append("  ".join(v.ljust(w) for v, w in zip(cells, widths, strict=True)) +
                     ("  PASS" if c.ok else f"  FAIL  {c.detail}"))
    return "\n".join(lines)
