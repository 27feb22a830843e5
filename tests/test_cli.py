"""The `slipstream` command end to end (in-process through `main`, real plugins, real ops)."""

from __future__ import annotations

import json

import pytest

from slipstream.cli import main
from slipstream.dispatch import force, set_tuning
from slipstream.plugins import reload


def test_doctor_lists_devices_and_the_four_plugins(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "Devices:" in out and "cpu:0" in out
    for name in ("nvidia", "rocm", "xpu", "template", "reference"):
        assert f"  {name} " in out
    assert "no AMD GPU visible" in out and "no Intel GPU visible" in out
    assert "rms_norm" in out and "attention" in out


def test_conformance_on_the_template_passes(capsys):
    assert main(["conformance", "slipstream-template", "--dtype", "fp32", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "template.swiglu" in out and "PASS" in out and "FAIL" not in out
    assert " 0 failed" in out


def test_conformance_of_an_unknown_plugin_says_what_is_installed(capsys):
    assert main(["conformance", "slipstream-acme"]) == 2
    assert "installed: " in capsys.readouterr().err


def test_explain_prints_a_real_trace(capsys):
    force("swiglu", None)
    assert main(["explain", "--op", "swiglu", "--tune"]) == 0
    out = capsys.readouterr().out
    assert "swiglu" in out and "(tuned" in out and "ms" in out
    assert "template.swiglu" in out and "reference.swiglu" in out


def test_tune_saves_decisions_for_a_model_config(tmp_path, capsys, monkeypatch):
    # The kernels would run under Triton's CPU interpreter here: this test is about the command.
    monkeypatch.setenv("SLIPSTREAM_DISABLE_PLUGINS", "nvidia,rocm,xpu")
    reload()
    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 97, "num_hidden_layers": 1}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    try:
        assert main(["tune", "--model", str(path), "--batch", "1", "--seq", "16", "--lora-rank", "4"]) == 0
    finally:
        monkeypatch.delenv("SLIPSTREAM_DISABLE_PLUGINS")
        reload()
    out = capsys.readouterr().out
    for op in ("rms_norm", "rope", "attention", "swiglu", "lora_linear", "linear_cross_entropy"):
        assert op in out
    assert "saved to" in out
    cache = out.strip().splitlines()[-1].removeprefix("saved to ").strip()
    with open(cache) as fh:
        assert json.load(fh)["entries"]


@pytest.fixture(autouse=True)
def _restore_settings():
    yield
    set_tuning(None)
