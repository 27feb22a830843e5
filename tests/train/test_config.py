"""TOML run files: every shipped config parses; unknown sections/keys and bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from slipstream.train.cli import build_config, configure
from slipstream.train.config import ConfigError, TrainConfig, config_from_dict, load_config, section_keys

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))


def test_shipped_configs_parse():
    assert CONFIGS, "configs/*.toml missing"
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg.model.name and cfg.data.path and cfg.train.output_dir


def test_quickstart_sections(tmp_path):
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/quickstart.toml")
    assert cfg.model.name == "builtin:tiny-llama"
    assert cfg.data.path == "builtin:stdlib-qa"
    assert cfg.train.save_every > 0 and cfg.train.output_dir == "runs/quickstart"


def test_sections_map_to_fields(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nname = "x"\nmax_seq_length = 64\n[data]\npath = "d.jsonl"\npacking = false\n'
                    '[lora]\nr = 4\ntarget_modules = ["q_proj", "v_proj"]\ngradient_checkpointing = "offload"\n'
                    '[train]\nlr = 1e-3\nbatch_size = 3\nmax_steps = 7\n[checkpoint]\nevery = 2\nkeep_last = 5\n'
                    '[output]\ndir = "out"\nsave_merged = true\n')
    cfg = load_config(path)
    assert (cfg.model.name, cfg.model.max_seq_length) == ("x", 64)
    assert cfg.data.path == "d.jsonl" and cfg.train.packing is False
    assert cfg.lora.r == 4 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.lora.gradient_checkpointing == "offload"
    t = cfg.train
    assert (t.lr, t.batch_size, t.max_steps, t.save_every, t.keep_last) == (1e-3, 3, 7, 2, 5)
    assert t.output_dir == "out" and t.save_merged is True


def test_unknown_key_names_key_and_valid_ones(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nlearning_rate = 1e-3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "learning_rate" in msg and "[train]" in msg and "lr" in msg and "batch_size" in msg
    assert str(path) in msg


def test_unknown_section_and_checkpoint_key():
    with pytest.raises(ConfigError, match=r"unknown section \[optim\].*\[model\]"):
        config_from_dict({"optim": {"lr": 1}})
    with pytest.raises(ConfigError, match=r"unknown key `save_every` in \[checkpoint\]; valid keys: every"):
        config_from_dict({"checkpoint": {"save_every": 1}})


@pytest.mark.parametrize("raw, fragment", [
    ({"train": {"batch_size": "8"}}, "[train] batch_size must be an integer"),
    ({"train": {"batch_size": 0}}, "batch_size must be a positive integer"),
    ({"train": {"schedule": "step"}}, "schedule must be one of"),
    ({"lora": {"gradient_checkpointing": "sometimes"}}, "gradient_checkpointing must be one of"),
    ({"model": {"load_in_4bit": "yes"}}, "[model] load_in_4bit must be true/false"),
    ({"checkpoint": {"every": True}}, "[checkpoint] every must be an integer"),
    ({"output": {"merged_dtype": "int8"}}, "merged_dtype must be one of"),
])
def test_bad_values(raw, fragment):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert fragment in str(info.value)


def test_every_trainconfig_field_has_a_toml_key():
    keys = {name for section in section_keys().values() for _part, name in section.values()}
    from dataclasses import fields

    assert {f.name for f in fields(TrainConfig)} <= keys


def test_cli_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nmax_steps = 100\n")
    import argparse

    args = configure(argparse.ArgumentParser()).parse_args([str(path), "--resume", "--max-steps", "3",
                                                           "--output-dir", str(tmp_path / "o")])
    cfg = build_config(args)
    assert cfg.train.resume and cfg.train.max_steps == 3 and cfg.train.output_dir == str(tmp_path / "o")


def test_max_memory_gib_is_read_and_checked():
    assert config_from_dict({"train": {"max_memory_gib": 23.4}}).train.max_memory_gib == 23.4
    assert config_from_dict({}).train.max_memory_gib is None
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="max_memory_gib must be a positive number of GiB"):
            config_from_dict({"train": {"max_memory_gib": bad}})
