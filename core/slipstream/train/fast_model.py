"""``FastModel``: load a causal LM through transformers, add LoRA through peft, route it onto slipstream.

    model, tokenizer = FastModel.from_pretrained("path-or-hub-id", max_seq_length=4096)
    model = FastModel.get_peft_model(model, r=16, lora_alpha=16, target_modules="all-linear")

Everything stays a plain transformers / peft object: adapters save and load with peft, merged
weights load with transformers. ``builtin:tiny-llama`` is the quickstart model shipped with
slipstream: a small Llama config and tokenizer, initialised randomly from a seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from slipstream.train.data import data_dir, resolve_builtin

BUILTIN_MODELS = {"tiny-llama": "tiny-llama"}
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
# Random-init models up to this many parameters are written to the cache once and then loaded like
# any checkpoint (so 4-bit loading, plain peft loading and merging work on them too).
MATERIALIZE_MAX_PARAMS = 1_000_000_000
INFO_ATTR = "_slipstream_info"


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """``None``/"auto": bf16 on GPUs that support it (fp16 on older ones), fp32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        try:
            return DTYPES[str(dtype)]
        except KeyError:
            raise ValueError(f"dtype must be None, 'auto', {', '.join(map(repr, DTYPES))} or a torch.dtype, "
                             f"got {dtype!r}") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "xpu":
        return torch.bfloat16
    return torch.float32


def model_info(model: torch.nn.Module) -> dict:
    """What :meth:`FastModel.from_pretrained` recorded about ``model`` (empty for other models)."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    return dict(getattr(base, INFO_ATTR, {}) or {})


def _has_weights(path: Path) -> bool:
    return any((path / f).exists() for f in WEIGHT_FILES)


def _param_estimate(config: Any) -> int:
    from slipstream.train.memory import ModelShape

    s = ModelShape.from_config(config)
    attn = s.hidden * (s.heads + 2 * s.kv_heads) * s.head_dim + s.heads * s.head_dim * s.hidden
    return s.layers * (attn + 3 * s.hidden * s.intermediate) + 2 * s.vocab * s.hidden


def _cache_root() -> Path:
    from slipstream.dispatch.cache import cache_dir

    return cache_dir() / "models"


def materialize_random(config_dir: Path, seed: int, name: str) -> Path:
    """Build a random-init model from ``config_dir`` (seeded), save it with the tokenizer, return the folder.

    Cached by the config, seed and library versions; written to a temporary folder and renamed,
    under a file lock, so concurrent runs never see a half-written model.
    """
    import transformers
    from filelock import FileLock
    from transformers import AutoConfig, AutoModelForCausalLM

    config_text = (config_dir / "config.json").read_text()
    stamp = f"{config_text}|{seed}|{torch.__version__}|{transformers.__version__}"
    digest = hashlib.sha1(stamp.encode()).hexdigest()[:12]
    target = _cache_root() / f"{name}-seed{seed}-{digest}"
    if _has_weights(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _has_weights(target):
            return target
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        config = AutoConfig.from_pretrained(config_dir)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(tmp)
        for f in config_dir.iterdir():
            if f.is_file() and f.name != "config.json" and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
        (tmp / "SLIPSTREAM_RANDOM_INIT.json").write_text(json.dumps(
            {"config": str(config_dir), "seed": seed, "torch": torch.__version__,
             "transformers": transformers.__version__}, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def _bnb_config(dtype: torch.dtype, device: torch.device) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ImportError("load_in_4bit=True needs bitsandbytes (pip install bitsandbytes); or load the "
                          "model in 16-bit with load_in_4bit=False") from exc
    if device.type not in ("cuda", "xpu", "cpu"):
        raise RuntimeError(f"load_in_4bit=True: bitsandbytes has no 4-bit kernels for {device.type} devices; "
                           f"use load_in_4bit=False")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.float32,
                              bnb_4bit_quant_storage=torch.uint8)


class FastModel:
    """Load, adapt and accelerate a causal LM (static methods; see the module docstring)."""

    @staticmethod
    def from_pretrained(model_name: str | os.PathLike, max_seq_length: int = 2048,
                        dtype: torch.dtype | str | None = None, load_in_4bit: bool = False, *,
                        device: torch.device | str | None = None, init: str = "auto", seed: int = 0,
                        attn_implementation: str | None = "sdpa", trust_remote_code: bool = False,
                        verbose: bool = True, **kwargs: Any) -> tuple[Any, Any]:
        """Load ``model_name`` (a local folder, a hub id, or ``builtin:tiny-llama``) and its tokenizer.

        Args:
            max_seq_length: longest row the trainer will build (recorded on the model).
            dtype: ``None``/"auto" (bf16 on GPUs that support it, fp32 on the CPU), "bf16", "fp16",
                "fp32" or a ``torch.dtype``.
            load_in_4bit: quantise the linear weights to NF4 with double quantisation (bitsandbytes).
            device: where the model goes; default :func:`slipstream.device.default_device`.
            init: "pretrained" (load weights), "random" (seeded random init from the folder's
                config), "auto" (random for built-in models, pretrained otherwise).
            kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from slipstream.device import default_device

        start = time.perf_counter()
        device = torch.device(device) if device not in (None, "auto") else default_device()
        dtype = resolve_dtype(dtype, device)
        name = str(model_name)
        builtin = resolve_builtin(name, BUILTIN_MODELS, "model") if name.startswith("builtin:") else None
        path = builtin or Path(name).expanduser()
        local = builtin is not None or path.exists()
        if init not in ("auto", "pretrained", "random"):
            raise ValueError(f"init must be 'auto', 'pretrained' or 'random', got {init!r}")
        if init == "auto":
            init = "random" if builtin is not None else "pretrained"
        if init == "pretrained" and local and not _has_weights(path):
            raise FileNotFoundError(f"{path} has no weights ({', '.join(WEIGHT_FILES[::2])}); pass "
                                    f"init='random' ([model] init = \"random\") to train a random-init model "
                                    f"built from its config")
        source = str(path) if local else name
        if init == "random":
            if not local:
                raise ValueError(f"init='random' needs a local folder with a config.json, got {name!r}")
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            if _param_estimate(config) > MATERIALIZE_MAX_PARAMS:
                raise ValueError(f"init='random' is for small models (up to {MATERIALIZE_MAX_PARAMS:,} "
                                 f"parameters); {path} has about {_param_estimate(config):,}")
            label = builtin.name if builtin is not None else path.name
            source = str(materialize_random(Path(path), seed, label))
        load_kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, **kwargs}
        if attn_implementation:
            load_kwargs["attn_implementation"] = attn_implementation
        if device.type != "cpu":
            load_kwargs["device_map"] = {"": str(device)}
        if load_in_4bit:
            load_kwargs["quantization_config"] = _bnb_config(dtype, device)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
        except Exception as exc:
            if load_in_4bit:
                raise RuntimeError(f"loading {name} in 4-bit on {device} failed: {type(exc).__name__}: "
                                   f"{exc}. bitsandbytes may not support this device; try load_in_4bit=False"
                                   ) from exc
            raise
        if device.type == "cpu" and next(model.parameters()).device.type != "cpu":
            model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        object.__setattr__(model, INFO_ATTR, {
            "name": name, "source": source, "init": init, "seed": seed,
            "max_seq_length": int(max_seq_length), "dtype": str(dtype).removeprefix("torch."),
            "load_in_4bit": bool(load_in_4bit), "device": str(device), "trust_remote_code": trust_remote_code,
        })
        if verbose:
            n = sum(p.numel() for p in model.parameters())
            what = f"random init (seed {seed})" if init == "random" else "pretrained"
            print(f"model: {name} [{model.config.model_type}, {n / 1e6:.1f}M parameters, {what}, "
                  f"{str(dtype).removeprefix('torch.')}{', nf4' if load_in_4bit else ''}] on {device} "
                  f"in {time.perf_counter() - start:.1f} s")
        return model, tokenizer

    @staticmethod
    def get_peft_model(model: Any, r: int = 16, lora_alpha: float = 16, lora_dropout: float = 0.0,
                       target_modules: str | list[str] = "all-linear",
                       gradient_checkpointing: bool | str = "auto", *, bias: str = "none",
                       modules_to_save: list[str] | None = None, accelerate: bool = True,
                       random_state: int = 0, verbose: bool = True, cuda_graphs: bool | None = None,
                       **lora_kwargs: Any) -> Any:
        """Add LoRA adapters with peft, route the model onto slipstream's ops, set checkpointing.

        ``target_modules="all-linear"`` means the seven Llama-style projections (q, k, v, o, gate,
        up, down) when the model has them, else peft's own ``"all-linear"``. ``gradient_checkpointing``
        is False, True, ``"lean"`` (no layer recompute; the cheap elementwise outputs are recomputed
        in backward instead of kept), ``"offload"``, or ``"auto"`` (the memory planner picks; the
        Trainer plans again once it knows the batch size). ``random_state`` seeds the adapters'
        initialisation (the global RNG is left as it was), so the same call gives the same adapters.
        ``cuda_graphs``: replay checkpointed layers from CUDA graphs (``None``: on CUDA devices unless
        ``SLIPSTREAM_CUDA_GRAPHS=0``); they cut the host's work per step, for about one layer's
        activations more device memory (see :mod:`slipstream.train.graphs`).
        """
        # bitsandbytes (imported by peft) warns at import that an optional CPU 4-bit kernel package is
        # missing; it is irrelevant unless training 4-bit on the CPU, where bitsandbytes works without it.
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        import peft

        from slipstream.train.offload import apply_checkpointing, policy_name

        targets = resolve_targets(model, target_modules)
        config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                 target_modules=targets, bias=bias, modules_to_save=modules_to_save,
                                 task_type="CAUSAL_LM", **lora_kwargs)
        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            devices = [model.device.index or 0] if model.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(random_state)
                peft_model = peft.get_peft_model(model, config)
        if accelerate:
            report = accelerate_model(peft_model)
            if verbose and report is not None:
                print(report)
        info = model_info(peft_model)
        if gradient_checkpointing == "auto":
            from slipstream.train.memory import plan_for_model

            seq = info.get("max_seq_length", 2048)
            plan = plan_for_model(peft_model, batch=1, seq=seq, graphs=cuda_graphs)
            if verbose:
                print(f"{plan.describe()} (batch 1 x {seq}; the Trainer plans again for its batch)")
            applied = plan.apply(peft_model, verbose=verbose)
        else:
            applied = apply_checkpointing(peft_model, gradient_checkpointing, verbose=verbose, graphs=cuda_graphs)
            if verbose and policy_name(gradient_checkpointing) != "none":
                print(f"gradient checkpointing: {applied} (requested)")
        base = peft_model.get_base_model()
        stored = dict(getattr(base, INFO_ATTR, {}) or {})
        stored["gradient_checkpointing_requested"] = gradient_checkpointing
        stored["accelerate"] = accelerate
        stored["cuda_graphs"] = cuda_graphs
        object.__setattr__(base, INFO_ATTR, stored)
        if verbose:
            trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in peft_model.parameters())
            where = ", ".join(targets) if isinstance(targets, list) else targets
            print(f"lora: r={r} alpha={lora_alpha} dropout={lora_dropout} on {where}: "
                  f"{trainable / 1e6:.2f}M trainable of {total / 1e6:.1f}M parameters")
        return peft_model


def resolve_targets(model: torch.nn.Module, target_modules: str | list[str]) -> str | list[str]:
    if target_modules != "all-linear":
        return [target_modules] if isinstance(target_modules, str) else list(target_modules)
    leaf_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) or type(m).__name__ in ("Linear4bit", "Linear8bitLt")}
    if all(p in leaf_names for p in LLAMA_PROJECTIONS):
        return list(LLAMA_PROJECTIONS)
    return "all-linear"


def accelerate_model(model: Any) -> Any:
    """Call ``slipstream.models.accelerate(model)``; returns its report, or ``None`` when unavailable."""
    try:
        from slipstream.models import accelerate
    except ImportError as exc:
        print(f"slipstream: slipstream.models is not available ({exc}); training with the plain transformers "
              f"modules (no slipstream ops)")
        return None
    return accelerate(model)


def uses_fused_loss(model: Any) -> bool:
    """Whether slipstream computes this model's loss without materialising logits."""
    try:
        from slipstream.models import report_of
    except ImportError:
        return False
    report = report_of(model)
    return bool(report and report.counts().get("linear_cross_entropy"))


def save_merged(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, base: str, dtype: torch.dtype,
                tokenizer: Any = None, trust_remote_code: bool = False) -> Path:
    """Merge the adapter in ``adapter_dir`` into a fresh copy of ``base`` (on the CPU, in ``dtype``), save it.

    The live training model is left untouched (it may be 4-bit or routed through slipstream's
    modules); the merged folder loads with plain ``AutoModelForCausalLM.from_pretrained``.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(fresh, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


__all__ = ["BUILTIN_MODELS", "LLAMA_PROJECTIONS", "FastModel", "accelerate_model", "data_dir", "model_info",
           "resolve_dtype", "resolve_targets", "save_merged", "uses_fused_loss"]
