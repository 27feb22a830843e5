"""Test-session setup shared by every test.

Without a GPU, Triton kernels run under Triton's CPU interpreter: ``TRITON_INTERPRET=1`` must be
set before any ``@triton.jit`` function is created, so it is set here, first.
"""

from __future__ import annotations

import os

os.environ.setdefault("SLIPSTREAM_QUIET", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own decision-cache directory; no test reads another's decisions."""
    monkeypatch.setenv("SLIPSTREAM_CACHE_DIR", str(tmp_path_factory.mktemp("slipstream-cache")))
    from slipstream.dispatch import dispatcher

    dispatcher().forget()
    yield
    dispatcher().forget()


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
