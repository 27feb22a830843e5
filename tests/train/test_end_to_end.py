"""End to end: `slipstream train CONFIG.toml` through the CLI functions; outputs load with plain peft/transformers."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from slipstream.train import cli
from slipstream.train.config import TrainConfig
from slipstream.train.trainer import Trainer
from tests.train.conftest import load_tiny

REQUIRED_METRICS = {"step", "loss", "lr", "tokens", "tokens_per_s", "peak_mem_gib"}


def write_data(path):
    rows = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"{i} plus {i} is {2 * i}."}
            for i in range(40)]
    rows += [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
             for w in ("yes", "no", "maybe", "later")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
    (path.parent / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[40:]))
    return path


def toml_config(tmp_path, tiny_dir, data, **extra) -> str:
    text = f'''
[model]
name = "{tiny_dir}"
init = "random"
max_seq_length = 64
device = "cpu"

[data]
path = "{data}"
completion_only = true
packing = {str(extra.pop("packing", True)).lower()}

[lora]
r = 8
alpha = 16
gradient_checkpointing = {json.dumps(extra.pop("gc", "auto"))}

[train]
max_steps = 4
batch_size = 2
lr = 1e-2
log_every = 1

[checkpoint]
every = 2
keep_last = 1

[output]
dir = "{tmp_path / 'out'}"
save_merged = true
'''
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def run_cli(argv) -> int:
    parser = argparse.ArgumentParser(prog="slipstream")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


@pytest.mark.parametrize("packing, gc", [(True, "auto"), (False, True), (True, "lean")])
def test_cli_trains_and_outputs_load_with_plain_libraries(tiny_dir, tmp_path, capsys, packing, gc):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_data(tmp_path / "data.jsonl")
    config = toml_config(tmp_path, tiny_dir, data.parent if packing else data, packing=packing, gc=gc)
    assert run_cli(["train", config]) == 0
    printed = capsys.readouterr().out
    assert "kernels chosen" in printed and "adapter saved" in printed
    assert "gradient checkpointing: " in printed
    if gc == "lean":
        assert "gradient checkpointing: lean (requested)" in printed

    out = tmp_path / "out"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert all(m.keys() >= REQUIRED_METRICS and m["tokens"] > 0 for m in lines)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000004"]

    adapter = out / "adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8
    assert sorted(adapter_config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    base = AutoModelForCausalLM.from_pretrained(adapter_config["base_model_name_or_path"])
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    trained_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert trained_b and all(float(p.abs().max()) > 0 for p in trained_b)  # B starts at 0: it trained

    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    ids = torch.randint(10, 3000, (2, 24))
    # merged W' = W + s * B @ A in fp32 vs the adapter applied on the fly: rounding of one fp32 add
    # and a different summation order, ~1e-6 relative on logits of size ~1
    torch.testing.assert_close(logits_of(merged, ids), logits_of(peft_model, ids), rtol=1e-4, atol=1e-4)

    # --resume after completion: nothing left to do, same outputs
    assert run_cli(["train", config, "--resume"]) == 0
    assert "continuing from" in capsys.readouterr().out


def test_merged_weights_match_the_trained_model(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from slipstream.models import deaccelerate

    model, tok = load_tiny(tiny_dir, accelerate=True)
    cfg = TrainConfig(max_steps=3, batch_size=2, lr=1e-2, output_dir=str(tmp_path), save_merged=True)
    result = Trainer(model, tok, "builtin:stdlib-qa", cfg, verbose=False).train()
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir).eval()
    assert merged.dtype == torch.float32
    model.eval()
    deaccelerate(model)
    ids = torch.randint(10, 3000, (2, 32))
    torch.testing.assert_close(logits_of(merged, ids), logits_of(model, ids), rtol=1e-4, atol=1e-4)


def test_bad_config_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nsteps = 3\n")
    assert run_cli(["train", str(path)]) == 2
    assert "unknown key `steps` in [train]" in capsys.readouterr().err
