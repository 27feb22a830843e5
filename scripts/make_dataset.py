"""Build the shipped quickstart data from text every Python install carries offline.

Writes, under ``core/slipstream/data/``:

- ``stdlib_qa.jsonl``: instruction/input/output pairs about the Python standard library, taken from
  its own docstrings ("What does `json.dumps` do?" -> the docstring's summary). Docstrings are part of
  CPython and licensed under the PSF License Agreement (see ``data/README.md``).
- ``tiny-llama/``: the quickstart model: a small Llama config (random init, no weights) and a
  byte-level BPE tokenizer trained on the dataset, with a simple chat template.

The committed files are the artifact: regenerating on another Python version gives slightly
different docstrings. Usage: ``python scripts/make_dataset.py [--out core/slipstream/data]``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import re
import sys
import warnings
from pathlib import Path

_MODULE_LIST = """
abc argparse array ast asyncio atexit base64 binascii bisect bz2 calendar cmath codecs codeop
collections collections.abc colorsys compileall concurrent.futures configparser contextlib copy csv
dataclasses datetime decimal difflib dis doctest email.message email.utils enum errno faulthandler
filecmp fnmatch fractions functools getopt gettext glob graphlib gzip hashlib heapq hmac html
http.client http.cookies http.server imaplib importlib importlib.util inspect io ipaddress itertools
json keyword linecache locale logging lzma mailbox math mimetypes multiprocessing netrc numbers
operator optparse os os.path pathlib pickle pkgutil platform plistlib pprint queue quopri random re
reprlib sched secrets selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl
stat statistics string struct subprocess sys sysconfig tarfile tempfile textwrap threading time
timeit token tokenize trace traceback tracemalloc types typing unicodedata unittest unittest.mock
urllib.parse urllib.request uuid venv warnings wave weakref webbrowser wsgiref.util xml.dom.minidom
xml.etree.ElementTree xmlrpc.client zipapp zipfile zlib zoneinfo
"""
MODULES = _MODULE_LIST.split()

ASK_WHAT = [
    "What does `{name}` do?",
    "Explain what `{name}` is for.",
    "In Python, what is `{name}`?",
    "Describe `{name}` in one or two sentences.",
]
ASK_SIG = ["What is the signature of `{name}`?", "How do I call `{name}`?"]
ASK_MODULE = ["What is the `{mod}` module for?", "Summarise the Python `{mod}` module."]

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    # Larger than Llama's 0.02 so a LoRA on a random-init base can move the logits within minutes:
    # with RMS-normalised hidden states (norm sqrt(256) = 16) the logit range is ~ std * 16 * 16.
    "initializer_range": 0.05,
    "torch_dtype": "float32",
}
VOCAB_SIZE = 3072


def summary(doc: str, limit: int = 420) -> str | None:
    """The docstring's first paragraph, one line, cut at a sentence end near ``limit`` characters."""
    doc = inspect.cleandoc(doc)
    para = doc.split("\n\n")[0]
    text = " ".join(para.split())
    if len(text) < 20 or text.startswith(("(", "::")) or "-->" in text or re.match(r"^[\w.]+\(.*\)", text):
        return None
    if len(text) > limit:
        cut = text[:limit]
        end = max(cut.rfind(". "), cut.rfind("; "))
        if end < 60:
            return None
        text = cut[: end + 1]
    return text


def signature(name: str, obj: object) -> str | None:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return None
    if len(sig) > 160 or " at 0x" in sig or "<" in sig:  # reprs with addresses are not reproducible
        return None
    return f"`{name}{sig}`"


def public_members(mod_name: str):
    """(qualified name, object) for the public functions and classes a module defines, and their methods."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(mod_name)
        except Exception:
            return None, []
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    found = []
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        if obj is None or not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
            continue
        owner = getattr(obj, "__module__", None) or ""
        if owner.lstrip("_") != mod_name.lstrip("_") and not owner.startswith(("_", mod_name)):
            continue
        found.append((f"{mod_name}.{name}", obj))
        if inspect.isclass(obj):
            for meth in sorted(vars(obj)):
                if meth.startswith("_"):
                    continue
                m = vars(obj)[meth]
                if inspect.isfunction(m) or inspect.ismethoddescriptor(m):
                    found.append((f"{mod_name}.{name}.{meth}", m))
    return module, found


def build_examples(rng: random.Random) -> list[dict]:
    examples: list[dict] = []
    seen: set[str] = set()
    for mod_name in MODULES:
        module, members = public_members(mod_name)
        if module is None:
            continue
        mod_doc = summary(module.__doc__ or "")
        if mod_doc:
            examples.append({"instruction": rng.choice(ASK_MODULE).format(mod=mod_name), "input": "",
                             "output": mod_doc, "source": mod_name})
        for name, obj in members:
            text = summary(getattr(obj, "__doc__", None) or "")
            if not text or text in seen:
                continue
            seen.add(text)
            kind = rng.random()
            if kind < 0.15:
                examples.append({"instruction": "Explain this Python standard library name.", "input": name,
                                 "output": text, "source": mod_name})
            else:
                examples.append({"instruction": rng.choice(ASK_WHAT).format(name=name), "input": "",
                                 "output": text, "source": mod_name})
            sig = signature(name, obj) if not inspect.isclass(obj) else None
            if sig and rng.random() < 0.35:
                examples.append({"instruction": rng.choice(ASK_SIG).format(name=name), "input": "",
                                 "output": f"Call it as {sig}.", "source": mod_name})
    rng.shuffle(examples)
    return examples


def render(example: dict) -> str:
    """The text the tokenizer is trained on: the chat-template rendering of an example."""
    prompt = example["instruction"] + ("\n\n" + example["input"] if example["input"] else "")
    return f"<s><|user|>\n{prompt}<|end|>\n<|assistant|>\n{example['output']}<|end|>\n"


def train_tokenizer(texts: list[str], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "<|end|>", "pad_token": "<pad>", "unk_token": None,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|end|>", "pad_token": "<pad>"}, indent=2) + "\n")
    vocab = tok.get_vocab()
    model_config = {**MODEL_CONFIG, "vocab_size": tok.get_vocab_size(), "bos_token_id": vocab["<s>"],
                    "eos_token_id": vocab["<|end|>"], "pad_token_id": vocab["<pad>"]}
    (out / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "core/slipstream/data"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    examples = build_examples(random.Random(args.seed))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "stdlib_qa.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    train_tokenizer([render(ex) for ex in examples], out / "tiny-llama")
    size = path.stat().st_size
    version = sys.version.split()[0]
    print(f"wrote {len(examples)} examples ({size / 1e6:.2f} MB) to {path} with Python {version}")


if __name__ == "__main__":
    main()
