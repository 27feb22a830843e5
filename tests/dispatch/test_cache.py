"""The on-disk decision cache: hits, misses, stale versions, corrupt files, concurrent writers."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch

from slipstream import ops
from slipstream.dispatch import dispatcher, explain, set_tuning
from slipstream.dispatch.cache import DecisionCache


@pytest.fixture
def tuned():
    set_tuning(True)
    yield
    set_tuning(None)


def cache_files() -> list[Path]:
    return sorted(Path(os.environ["SLIPSTREAM_CACHE_DIR"]).glob("decisions-*.json"))


def test_decision_is_saved_and_read_back(tuned):
    ops.swiglu(torch.randn(4, 32), torch.randn(4, 32))
    assert explain("swiglu")[-1].mode == "tuned"
    (path,) = cache_files()
    data = json.loads(path.read_text())
    assert data["stamp"]["versions"]["torch"] == torch.__version__.split("+")[0]
    assert "template" in data["stamp"]["plugins"]
    assert any(k.startswith("swiglu|") for k in data["entries"])
    dispatcher().forget()  # a new process would start like this
    ops.swiglu(torch.randn(3, 32), torch.randn(3, 32))  # same bucket
    assert explain("swiglu")[-1].mode == "cached"
    ops.swiglu(torch.randn(30, 32), torch.randn(30, 32))  # another bucket: a miss
    assert explain("swiglu")[-1].mode == "tuned"


def test_stale_versions_are_ignored_with_a_warning(tuned):
    ops.swiglu(torch.randn(4, 32), torch.randn(4, 32))
    (path,) = cache_files()
    data = json.loads(path.read_text())
    data["stamp"]["versions"]["torch"] = "1.0.0"
    path.write_text(json.dumps(data))
    dispatcher().forget()
    with pytest.warns(RuntimeWarning, match="stale \\(changed: versions\\)"):
        ops.swiglu(torch.randn(4, 32), torch.randn(4, 32))
    assert explain("swiglu")[-1].mode == "tuned"
    assert json.loads(path.read_text())["stamp"]["versions"]["torch"] != "1.0.0"  # rewritten


def test_corrupt_file_is_ignored_with_a_warning_and_replaced(tuned):
    ops.swiglu(torch.randn(4, 32), torch.randn(4, 32))
    (path,) = cache_files()
    path.write_text('{"stamp": {"format": 1}, "entries": {"swiglu|')  # truncated write
    dispatcher().forget()
    with pytest.warns(RuntimeWarning, match="corrupt"):
        ops.swiglu(torch.randn(4, 32), torch.randn(4, 32))
    assert json.loads(path.read_text())["entries"]


def _writer(directory: str, worker: int, count: int) -> None:
    cache = DecisionCache("cpu:test:device", {"versions": {"torch": "x"}}, Path(directory))
    for i in range(count):
        cache.put(f"key-{worker}-{i}", {"chosen": f"impl-{worker}", "i": i})


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 25)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    cache = DecisionCache("cpu:test:device", {"versions": {"torch": "x"}}, tmp_path)
    entries = cache.entries()
    assert len(entries) == 50
    assert {e["chosen"] for e in entries.values()} == {"impl-0", "impl-1"}
    assert not list(tmp_path.glob("*.tmp"))  # no temporary files left behind


def test_two_processes_tuning_the_same_op_at_once(tmp_path):
    """Both processes tune, both save; the file stays valid JSON with the decision in it."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_tune_in_child, args=(str(tmp_path),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    (path,) = list(tmp_path.glob("decisions-*.json"))
    entries = json.loads(path.read_text())["entries"]
    assert any(k.startswith("swiglu|") for k in entries)


def _tune_in_child(directory: str) -> None:
    os.environ["SLIPSTREAM_CACHE_DIR"] = directory
    os.environ["SLIPSTREAM_TUNE"] = "1"
    os.environ["SLIPSTREAM_QUIET"] = "1"
    import torch as t

    from slipstream import ops as o

    o.swiglu(t.randn(4, 32), t.randn(4, 32))
