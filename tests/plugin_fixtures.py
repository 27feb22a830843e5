"""Installing throwaway plugin distributions for tests, the way pip would: a module plus a
``.dist-info`` folder with an ``entry_points.txt`` on ``sys.path``. Plugins then load through the
real ``importlib.metadata`` entry-point discovery, not through any test-only door."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import slipstream.plugins as plugins


class PluginInstaller:
    def __init__(self, root: Path):
        self.root = root
        self.modules: list[str] = []

    def install(self, name: str, source: str, *, dist: str | None = None, version: str = "1.0.0") -> None:
        """Install plugin ``name`` whose module body is ``source``; reload the plugin system."""
        module = f"slipstream_testplugin_{name}"
        dist = dist or f"slipstream-testplugin-{name}"
        (self.root / f"{module}.py").write_text(textwrap.dedent(source))
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[slipstream.backends]\n{name} = {module}\n")
        self.modules.append(module)
        importlib.invalidate_caches()

    def uninstall_all(self) -> None:
        for module in self.modules:
            sys.modules.pop(module, None)


@pytest.fixture
def plugin_installer(tmp_path: Path) -> Iterator[PluginInstaller]:
    root = tmp_path / "site"
    root.mkdir()
    sys.path.insert(0, str(root))
    installer = PluginInstaller(root)
    try:
        yield installer
    finally:
        sys.path.remove(str(root))
        installer.uninstall_all()
        importlib.invalidate_caches()
        plugins.reload()
