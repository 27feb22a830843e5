"""The on-disk decision cache: one JSON file per device, stamped with every version that matters.

Tuning a device once should last until something that could change the answer changes: the
device, torch, triton, slipstream, or any plugin's version. A file whose stamp differs is stale
and ignored with a warning (and replaced on the next save); a file that doesn't parse is corrupt,
ignored with a warning, and replaced. Writes take a file lock, merge with what other processes
wrote meanwhile, and land atomically (write to a temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

from filelock import FileLock

FORMAT = 1


def cache_dir() -> Path:
    root = os.environ.get("SLIPSTREAM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slipstream")
    return Path(root)


class DecisionCache:
    """Decisions of one device, keyed by the dispatch key's string form."""

    def __init__(self, device_key: str, stamp: dict[str, object], directory: Path | None = None):
        self.stamp = {"format": FORMAT, "device": device_key, **stamp}
        digest = hashlib.sha1(device_key.encode()).hexdigest()[:12]
        self.path = (directory or cache_dir()) / f"decisions-{digest}.json"
        self._entries: dict[str, dict] | None = None

    def _read(self, *, warn: bool) -> dict[str, dict]:
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            if warn:
                warnings.warn(f"slipstream: cannot read tuning cache {self.path}: {exc}; tuning again",
                              RuntimeWarning, stacklevel=3)
            return {}
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
                raise ValueError("missing 'entries'")
        except ValueError as exc:
            if warn:
                warnings.warn(f"slipstream: tuning cache {self.path} is corrupt ({exc}); ignoring it, it will be "
                              "rewritten", RuntimeWarning, stacklevel=3)
            return {}
        if data.get("stamp") != self.stamp:
            if warn:
                old = data.get("stamp") or {}
                changed = sorted(k for k in set(old) | set(self.stamp) if old.get(k) != self.stamp.get(k))
                warnings.warn(f"slipstream: tuning cache {self.path} is stale (changed: {', '.join(changed)}); "
                              "ignoring it, decisions will be re-tuned", RuntimeWarning, stacklevel=3)
            return {}
        return data["entries"]

    def get(self, key: str) -> dict | None:
        if self._entries is None:
            self._entries = self._read(warn=True)
        return self._entries.get(key)

    def entries(self) -> dict[str, dict]:
        if self._entries is None:
            self._entries = self._read(warn=True)
        return dict(self._entries)

    def put(self, key: str, entry: dict) -> None:
        """Record one decision: lock, merge with the file as it is now, write atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock", timeout=60):
            current = self._read(warn=False)
            current[key] = entry
            payload = json.dumps({"stamp": self.stamp, "entries": current}, indent=1, sort_keys=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(payload)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self._entries = current
