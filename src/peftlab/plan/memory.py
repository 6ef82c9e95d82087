"""Memory planner: predicts the peak memory of a run, per component, from the model's shapes alone.

No weights are loaded. Shapes come from the built-in table of the seed's models, a model alias, a local
``config.json`` folder, or a hub id (``transformers.AutoConfig``, needs network). The model is a Llama-style decoder
(Llama, Mistral, Gemma, Qwen2...): per layer q/k/v/o projections, a gated MLP (gate/up/down) and two norms.

The peak is the larger of two moments (bytes; N = batch x sequence tokens, a = activation bytes per element):

* forward/backward: runtime + base weights + trainable weights + optimizer states + gradients held
  + activations + logits/cross-entropy buffers;
* optimizer step: runtime + base weights + trainable weights + gradients + optimizer states + step temporaries.

Components:

* **runtime**: CPU: the RSS of a bare ``import torch, transformers, peft`` process (measured, 0.415 GiB with torch
  2.13 CPU / transformers 5.23 / peft 0.21) plus 0.07 GiB for what a run adds before training (tokenizer, data, the
  baseline evaluation's leftovers; measured as the RSS when training starts minus the bare import and the weights:
  0.055-0.06 GiB on smollm2-135m for full, LoRA and QLoRA). CUDA: 0.5 GiB for the CUDA context and cuBLAS workspace
  (an estimate, not measured here; torch's max_allocated/max_reserved do not include it).
* **base weights**: frozen weights at their stored precision. 4-bit NF4 (QLoRA): every decoder linear layer at
  0.5 byte/parameter plus one absmax per 64-value block (fp32, or with double quantization uint8 plus one fp32 per
  256 blocks and a 256-entry code), per tensor a 16-entry quant map; embeddings, lm_head and norms stay unquantized
  in fp32 (peft's k-bit preparation upcasts them).
* **trainable weights**: LoRA r x (in + out) per targeted module and layer (DoRA adds a magnitude vector of `out`),
  IA3 one vector per target (out, or in for feed-forward targets), prefix tuning virtual tokens x layers x 2 x
  kv width; all in fp32 (peft keeps adapters in fp32). Full fine-tuning: every weight at the model dtype.
* **gradients**: one per trainable weight at its dtype. During forward/backward all are held for PEFT methods or
  with gradient accumulation; full fine-tuning without accumulation holds only the output layer's gradient at the
  activation peak (the start of backward).
* **optimizer states**: AdamW two states per trainable weight at its dtype (fp32 for adapters); adamw8bit two bytes;
  sgd none.
* **optimizer step temporaries**: none for the fused AdamW that training uses by default (``fused_optimizer``);
  otherwise CPU (single-tensor AdamW): two copies of the largest trainable tensor, CUDA (foreach AdamW): one copy of
  all trainable weights.
* **activations** (tensors saved for backward, per token and layer): frozen base: norm inputs 2h, q and attention
  output 2 q_dim, k and v 2 kv_dim (SDPA keeps GQA unexpanded), MLP 3 i (activation input/output, up), at ``a`` bytes,
  plus per token 2 norm statistics and one log-sum-exp per head in fp32. Full fine-tuning adds the inputs the weight
  gradients need: 2h normalized + 2h norm outputs + i (down_proj input), and 3h at the head. LoRA adds per target
  r (fp32) and, with dropout, its output and mask (CPU: 2 d_in fp32; CUDA: d_in fp32 + d_in bool). Gradient
  checkpointing keeps only each layer's input (h) plus one layer recomputed. QLoRA computes activations in fp32.
* **logits/cross-entropy**: with ``chunked_ce`` (the default) the LM head and the loss run over chunks of 1024
  tokens in one reused logits buffer per chunk shape (a full chunk and a batch's last, shorter one), where the
  softmax and its gradient are computed in place: 4 bytes per vocabulary entry per buffered token in fp32; in
  bf16/fp16 the buffer holds 2, plus a chunk's fp32 copy and its cast gradient (6 more); plus the gradient of the
  hidden states (h per token). Without it: 12 bytes per vocabulary entry per token (the logits, the log-softmax
  output and two gradient buffers over every token).

The activation terms were checked against the tensors autograd actually saves (``saved_tensors_hooks``) on
smollm2-135m and tiny random models (tests/test_plan.py). On CPU the measured figure is peak RSS; glibc keeps freed
heap pages, which adds a slack that grows over the first steps and that no formula predicts (on smollm2-135m,
3 steps: full +17 %, LoRA +27 %, QLoRA +40-75 %) unless large allocations are mmapped and returned on free
(``MALLOC_MMAP_THRESHOLD_=131072`` or ``mallopt(M_MMAP_THRESHOLD, 131072)``); see benchmarks/memory_methods.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peftlab.errors import UserError

GIB = 1024**3
BARE_IMPORT_RSS_GIB = 0.415
RUN_OVERHEAD_GIB = 0.07
CUDA_CONTEXT_GIB = 0.5
CE_BYTES_PER_LOGIT = 12  # unchunked: logits, log-softmax and two gradient buffers, per token and vocabulary entry
CE_CHUNK = 1024  # tokens per chunk of peftlab.losses.chunked_linear_cross_entropy
NF4_BLOCK = 64
DQ_BLOCK = 256
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
LORA_FAMILY = ("lora", "qlora", "dora", "rslora", "pissa", "loraplus")
IA3_DEFAULT_TARGETS = ("k_proj", "v_proj", "down_proj")
FEEDFORWARD = ("down_proj",)
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DECODER_TYPES = ("llama", "mistral", "gemma", "qwen2", "qwen3", "olmo", "olmo2", "granite")


@dataclass(frozen=True)
class Arch:
    """The shapes of a Llama-style decoder, enough to count weights and activations."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    max_positions: int | None = None

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one decoder layer."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linear_params(self) -> int:
        """Weights (and q/k/v biases, if any) of one layer's linear layers."""
        n = sum(a * b for a, b in self.linear_shapes().values())
        return n + (self.q_dim + 2 * self.kv_dim if self.attention_bias else 0)

    def embedding_params(self) -> int:
        """Input embedding plus an untied output head."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def norm_params(self) -> int:
        """Two norms per layer and the final norm."""
        return (2 * self.num_layers + 1) * self.hidden_size

    def total_params(self) -> int:
        return self.num_layers * self.layer_linear_params() + self.embedding_params() + self.norm_params()


# Architecture numbers of the seed's models (from their published config.json files).
BUILTIN_ARCHS: dict[str, Arch] = {a.name: a for a in [
    Arch("Llama-2-7B", 32000, 4096, 11008, 32, 32, 32, 128, False, max_positions=4096),
    Arch("Mistral-7B-v0.1", 32000, 4096, 14336, 32, 32, 8, 128, False, max_positions=32768),
    Arch("Gemma-7B", 256000, 3072, 24576, 28, 16, 16, 256, True, max_positions=8192),
    Arch("Gemma-2B", 256000, 2048, 16384, 18, 8, 1, 256, True, max_positions=8192),
    Arch("Llama-3-8B", 128256, 4096, 14336, 32, 32, 8, 128, False, max_positions=8192),
]}
BUILTIN_HUB_IDS = {"meta-llama/llama-2-7b-hf": "Llama-2-7B", "meta-llama/llama-2-7b": "Llama-2-7B",
                   "mistralai/mistral-7b-v0.1": "Mistral-7B-v0.1", "google/gemma-7b": "Gemma-7B",
                   "google/gemma-2b": "Gemma-2B", "meta-llama/meta-llama-3-8b": "Llama-3-8B",
                   "meta-llama/llama-3-8b": "Llama-3-8B"}


def builtin_arch(name: str) -> Arch | None:
    """A seed model from the built-in table, by short name or hub id (case-insensitive)."""
    key = name.strip().lower()
    for short, arch in BUILTIN_ARCHS.items():
        if key == short.lower():
            return arch
    short = BUILTIN_HUB_IDS.get(key)
    return BUILTIN_ARCHS[short] if short else None


def arch_from_config(config: Any, name: str) -> Arch:
    """An :class:`Arch` from a transformers config (or a plain dict of config.json)."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    text = get("text_config")
    if text is not None and get("hidden_size") is None:
        return arch_from_config(text, name)
    model_type = get("model_type") or "?"
    needed = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in needed if get(k) is None]
    if missing or model_type not in DECODER_TYPES:
        raise UserError(f"model {name!r} ({model_type}) is not a Llama-style decoder the planner knows "
                        f"(supported: {', '.join(DECODER_TYPES)}); "
                        "plan a decoder such as " + ", ".join(BUILTIN_ARCHS))
    heads = int(get("num_attention_heads"))
    hidden = int(get("hidden_size"))
    return Arch(name=name, vocab_size=int(get("vocab_size")), hidden_size=hidden,
                intermediate_size=int(get("intermediate_size")), num_layers=int(get("num_hidden_layers")),
                num_heads=heads, num_kv_heads=int(get("num_key_value_heads") or heads),
                head_dim=int(get("head_dim") or hidden // heads),
                tie_word_embeddings=bool(get("tie_word_embeddings", True)),
                attention_bias=bool(get("attention_bias", model_type in ("qwen2",))),
                max_positions=get("max_position_embeddings"))


def load_arch(name: str) -> Arch:
    """Shapes for a model name: built-in table, alias, local folder with config.json, or hub id."""
    from peftlab.models import ALIASES, resolve_model_source

    arch = builtin_arch(name)
    if arch is not None:
        return arch
    path = Path(name).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        return arch_from_config(json.loads(path.read_text(encoding="utf-8")), name)
    if name in ALIASES or path.exists():
        source = Path(resolve_model_source(name))
        return arch_from_config(json.loads((source / "config.json").read_text(encoding="utf-8")), name)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"model {name!r}: no such folder or config.json, and not in the built-in table "
                        f"({', '.join(BUILTIN_ARCHS)}); give a folder with config.json, an alias "
                        f"({', '.join(ALIASES)}) or a hub id")
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise UserError(f"model {name!r}: its config could not be fetched ({str(exc).splitlines()[0]}); it is not "
                        f"in the built-in table ({', '.join(BUILTIN_ARCHS)}); with network access set "
                        "HF_HUB_OFFLINE=0, or give a local folder with config.json") from None
    return arch_from_config(config, name)


@dataclass
class PlanInput:
    """What the planner needs to know about a run besides the model's shapes."""

    method: str = "lora"
    r: int = 8
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    targets_given: bool = False
    dropout: float = 0.1
    batch_size: int = 4
    seq_len: int = 128
    grad_accum: int = 8
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    double_quant: bool = True
    num_virtual_tokens: int = 20
    vocab_logits: bool = True  # a language-modelling head (False: a classifier with few outputs)
    chunked_ce: bool = True
    fused_optimizer: bool = True


@dataclass
class Plan:
    """Predicted peak memory, per component (bytes), at the moment of the peak."""

    model: str
    inputs: PlanInput
    components: dict[str, int]
    peak_phase: str
    phases: dict[str, int]
    counts: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return sum(self.components.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, in GiB."""
        return {"model": self.model, "inputs": asdict(self.inputs), "peak_gb": self.peak_bytes / GIB,
                "peak_phase": self.peak_phase,
                "components_gb": {k: v / GIB for k, v in self.components.items()},
                "phases_gb": {k: v / GIB for k, v in self.phases.items()}, "counts": self.counts,
                "notes": self.notes}


def resolve_plan_targets(arch: Arch, inp: PlanInput) -> list[str]:
    """The per-layer modules a method adapts (IA3 defaults to k/v/down, like peft for Llama)."""
    if inp.method == "ia3" and not inp.targets_given:
        return list(IA3_DEFAULT_TARGETS)
    known = arch.linear_shapes()
    wrong = [t for t in inp.target_modules if t not in known]
    if wrong:
        raise UserError(f"target_modules: the planner's model has no linear module named {', '.join(wrong)}; "
                        f"its per-layer linear modules are {', '.join(known)}")
    return list(inp.target_modules)


def trainable_params(arch: Arch, inp: PlanInput) -> tuple[int, int]:
    """(trainable parameters, the largest trainable tensor) for a method."""
    shapes = arch.linear_shapes()
    layers = arch.num_layers
    if inp.method == "full":
        largest = max(arch.vocab_size * arch.hidden_size, *(a * b for a, b in shapes.values()))
        return arch.total_params(), largest
    if inp.method == "prefix":
        n = inp.num_virtual_tokens * layers * 2 * arch.kv_dim
        return n, n
    targets = resolve_plan_targets(arch, inp)
    if inp.method == "ia3":
        sizes = [shapes[t][0] if t in FEEDFORWARD else shapes[t][1] for t in targets]
        return layers * sum(sizes), max(sizes)
    if inp.method not in LORA_FAMILY:
        raise UserError(f"method {inp.method!r}: the planner knows full, prefix, ia3 and "
                        f"{', '.join(LORA_FAMILY)}")
    per_layer = sum(inp.r * (shapes[t][0] + shapes[t][1]) for t in targets)
    if inp.method == "dora":
        per_layer += sum(shapes[t][1] for t in targets)
    largest = max(inp.r * max(shapes[t]) for t in targets)
    return layers * per_layer, largest


def nf4_bytes(n: int, double_quant: bool) -> int:
    """Bytes of one weight tensor of n values in bitsandbytes 4-bit: packed values, absmax, quant map."""
    blocks = math.ceil(n / NF4_BLOCK)
    size = (n + 1) // 2 + 16 * 4  # packed nibbles + the 16-entry quant map
    if double_quant:
        size += blocks + math.ceil(blocks / DQ_BLOCK) * 4 + 256 * 4 + 4  # uint8 absmax, fp32 absmax2, code, offset
    else:
        size += blocks * 4
    return size


def base_weight_bytes(arch: Arch, inp: PlanInput) -> int:
    """Frozen weights at their stored precision (0 for full fine-tuning: every weight is trainable)."""
    if inp.method == "full":
        return 0
    if inp.method == "qlora":
        quantized = arch.num_layers * sum(nf4_bytes(a * b, inp.double_quant) for a, b in arch.linear_shapes().values())
        bias = arch.num_layers * (arch.q_dim + 2 * arch.kv_dim if arch.attention_bias else 0)
        return quantized + 4 * (arch.embedding_params() + arch.norm_params() + bias)
    return DTYPE_BYTES[inp.dtype] * arch.total_params()


def activation_bytes_per_token(arch: Arch, inp: PlanInput) -> tuple[int, int]:
    """(bytes saved for backward per token by all layers, of which in one layer), without the logits buffers."""
    a = 4 if inp.method == "qlora" else DTYPE_BYTES[inp.dtype]
    h, i, q, kv = arch.hidden_size, arch.intermediate_size, arch.q_dim, arch.kv_dim
    layer = a * (2 * h + 2 * q + 2 * kv + 3 * i) + 4 * (2 + arch.num_heads)
    head = a * h
    if inp.method == "full":
        layer += a * (4 * h + i)
        head = 3 * a * h
    elif inp.method in LORA_FAMILY:
        shapes = arch.linear_shapes()
        targets = resolve_plan_targets(arch, inp)
        groups: set[str] = set()
        for t in targets:
            d_in, d_out = shapes[t]
            layer += 4 * inp.r
            if inp.dropout > 0:
                layer += (4 + 1) * d_in if inp.device == "cuda" else 2 * 4 * d_in
            elif a != 4:
                layer += 4 * d_in  # each target's fp32 cast of its input
            else:
                group = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp",
                         "up_proj": "mlp"}.get(t, t)
                if group not in groups and t != "o_proj":  # o_proj's input is the saved attention output
                    layer += 4 * d_in
                groups.add(group)
            if inp.method == "dora":
                layer += (a + 4) * d_out
    elif inp.method == "ia3":
        shapes = arch.linear_shapes()
        layer += sum(a * (shapes[t][0] if t in FEEDFORWARD else shapes[t][1]) for t in resolve_plan_targets(arch, inp))
    elif inp.method == "prefix":
        layer += 2 * a * (q - kv)  # with a mask, attention repeats k/v to every head
    if inp.gradient_checkpointing:
        return arch.num_layers * a * h + layer + head, layer
    return arch.num_layers * layer + head, layer


def runtime_bytes_default(device: str) -> int:
    """The calibrated runtime term (see the module docstring)."""
    if device == "cuda":
        return int(CUDA_CONTEXT_GIB * GIB)
    return int((BARE_IMPORT_RSS_GIB + RUN_OVERHEAD_GIB) * GIB)


def chunked_ce_bytes(tokens: int, vocab: int, act_bytes: int) -> int:
    """Logits memory of peftlab.losses.chunked_linear_cross_entropy for one micro-batch of ``tokens`` tokens."""
    buffered = min(tokens, CE_CHUNK) + (tokens % CE_CHUNK if tokens > CE_CHUNK else 0)  # the reused buffers
    transient = 0 if act_bytes == 4 else min(tokens, CE_CHUNK) * (4 + act_bytes)  # fp32 copy + cast gradient
    return (buffered * act_bytes + transient) * vocab


def plan_memory(arch: Arch, inp: PlanInput, runtime_bytes: int | None = None,
                exact_weights: dict[str, int] | None = None) -> Plan:
    """Predict the peak memory of a run; ``exact_weights`` (base/trainable bytes of a loaded model) override counts."""
    if inp.optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer {inp.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if inp.dtype not in DTYPE_BYTES:
        raise UserError(f"dtype {inp.dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")
    n_train, largest = trainable_params(arch, inp)
    pbytes = DTYPE_BYTES[inp.dtype] if inp.method == "full" else 4
    trainable = n_train * pbytes
    base = base_weight_bytes(arch, inp)
    if exact_weights:
        base, trainable = exact_weights.get("base", base), exact_weights.get("trainable", trainable)
    grads = trainable
    states = {"adamw": 2 * trainable, "adamw8bit": 2 * n_train, "sgd": 0}[inp.optimizer]
    step_temp = trainable if inp.device == "cuda" else 2 * largest * pbytes
    if inp.optimizer == "sgd" or (inp.fused_optimizer and inp.method != "loraplus"):
        step_temp = 0  # fused AdamW updates in place (LoRA+ builds its own, unfused optimizer)
    tokens = inp.batch_size * inp.seq_len
    per_token, _ = activation_bytes_per_token(arch, inp)
    acts = tokens * per_token
    if inp.method == "prefix":
        acts += arch.num_layers * inp.batch_size * inp.num_virtual_tokens * 2 * arch.kv_dim * DTYPE_BYTES[inp.dtype]
    if inp.method == "dora":  # one dense B @ A product at a time (the weight norm)
        shapes = arch.linear_shapes()
        acts += max(4 * shapes[t][0] * shapes[t][1] for t in resolve_plan_targets(arch, inp))
    logits = 0
    if inp.vocab_logits and inp.chunked_ce:
        act_bytes = 4 if inp.method == "qlora" else DTYPE_BYTES[inp.dtype]
        logits = chunked_ce_bytes(tokens, arch.vocab_size, act_bytes) + tokens * arch.hidden_size * act_bytes
    elif inp.vocab_logits:
        logits = CE_BYTES_PER_LOGIT * tokens * arch.vocab_size
    held = grads
    if inp.method == "full" and inp.grad_accum == 1:
        held = arch.vocab_size * arch.hidden_size * pbytes  # the output layer's gradient, first in backward
    runtime = runtime_bytes_default(inp.device) if runtime_bytes is None else runtime_bytes
    fixed = {"runtime": runtime, "base_weights": base, "trainable_weights": trainable, "optimizer_states": states}
    fwd = dict(fixed, gradients=held, activations=acts, logits_ce=logits, optimizer_step_temp=0)
    step = dict(fixed, gradients=grads, activations=0, logits_ce=0, optimizer_step_temp=step_temp)
    phases = {"forward_backward": sum(fwd.values()), "optimizer_step": sum(step.values())}
    peak_phase = max(phases, key=phases.get)
    notes = []
    if inp.method == "prefix":
        notes.append("prefix tuning: activations approximate (attention with a mask repeats k/v per head)")
    if inp.method == "dora":
        notes.append("dora: activations approximate (magnitude and weight-norm terms)")
    if inp.device == "cuda":
        notes.append("cuda: runtime is the CUDA context (not in torch.cuda.max_memory_*); reserved memory is "
                     "usually 5-20% above allocated")
    counts = {"trainable_params": n_train, "total_params": arch.total_params() + (0 if inp.method == "full"
                                                                                   else n_train),
              "tokens_per_micro_batch": tokens}
    return Plan(model=arch.name, inputs=inp, components=fwd if peak_phase == "forward_backward" else step,
                peak_phase=peak_phase, phases=phases, counts=counts, notes=notes)


def plan_input_from_config(cfg, optimizer: str = "adamw", task_kind: str = "causal_lm") -> PlanInput:
    """PlanInput for a RunConfig (device/dtype 'auto' resolve to what is here: CUDA if visible, else CPU)."""
    device = cfg.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    seq_len = cfg.block_size if cfg.task == "clm" else cfg.max_length
    return PlanInput(method=cfg.method, r=cfg.r, target_modules=tuple(cfg.target_modules),
                     targets_given="target_modules" in cfg.model_fields_set, dropout=cfg.dropout,
                     batch_size=cfg.batch_size, seq_len=seq_len, grad_accum=cfg.grad_accum, optimizer=optimizer,
                     gradient_checkpointing=cfg.gradient_checkpointing, device=device, dtype=dtype,
                     double_quant=cfg.double_quant, num_virtual_tokens=cfg.num_virtual_tokens,
                     vocab_logits=task_kind == "causal_lm", chunked_ce=getattr(cfg, "chunked_ce", True),
                     fused_optimizer=getattr(cfg, "fused_optimizer", True))


def loaded_weight_bytes(model) -> dict[str, int]:
    """Exact bytes of a loaded model's frozen and trainable weights (4-bit tensors with their quant states)."""
    base = trainable = 0
    for param in model.parameters():
        size = param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)
        if state is not None:
            for tensor in _quant_state_tensors(state):
                size += tensor.numel() * tensor.element_size()
        if param.requires_grad:
            trainable += size
        else:
            base += size
    return {"base": base, "trainable": trainable}


def _quant_state_tensors(state) -> list:
    import torch

    out = [getattr(state, k) for k in ("absmax", "code", "offset") if torch.is_tensor(getattr(state, k, None))]
    nested = getattr(state, "state2", None)
    if nested is not None:
        out += [getattr(nested, k) for k in ("absmax", "code") if torch.is_tensor(getattr(nested, k, None))]
    return out


def estimate_for_run(cfg, model) -> dict[str, Any]:
    """The per-component estimate stored in results.json["memory"]["estimate"] (never raises for a user mistake)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or cfg.model
    config = getattr(model, "config", None)
    base_model = getattr(model, "get_base_model", lambda: model)()
    task_kind = "seq_cls" if "SequenceClassification" in type(base_model).__name__ else "causal_lm"
    try:
        arch = arch_from_config(getattr(base_model, "config", config), cfg.model)
        inp = plan_input_from_config(cfg, task_kind=task_kind)
        plan = plan_memory(arch, inp, exact_weights=loaded_weight_bytes(model))
    except UserError as exc:
        return {"available": False, "reason": str(exc), "model": name}
    out = plan.as_dict()
    out["available"] = True
    out["measured_kind"] = "cuda_max_allocated (+context)" if inp.device == "cuda" else "cpu_peak_rss_train"
    return out


def plan_for_config(cfg, model: str | None = None, optimizer: str = "adamw", runtime_bytes: int | None = None) -> Plan:
    """Plan a RunConfig's run without loading weights."""
    arch = load_arch(model or cfg.model)
    task_kind = "seq_cls" if cfg.task == "classification" else "causal_lm"
    return plan_memory(arch, plan_input_from_config(cfg, optimizer, task_kind), runtime_bytes=runtime_bytes)


def measure_runtime_rss() -> int:
    """RSS (bytes) of a fresh ``import torch, transformers, peft`` process: the CPU runtime calibration."""
    code = ("import torch, transformers, peft\n"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS:')][0])")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0 or not out.stdout.strip():
        raise UserError("could not measure the runtime's RSS (needs Linux /proc); pass --runtime-gb instead")
    return int(out.stdout.strip().splitlines()[-1]) * 1024


def runtime_bytes_option(runtime_gb: float | None, measure: bool) -> int | None:
    """The runtime term from the CLI: a given figure, a fresh measurement (+ the run overhead), or the default."""
    if runtime_gb is not None:
        return int(runtime_gb * GIB)
    if measure:
        return measure_runtime_rss() + int(RUN_OVERHEAD_GIB * GIB)
    return None


# ---- the seed's tables ------------------------------------------------------------------------------------------

SEED_TABLE_MODELS = ("Mistral-7B-v0.1", "Llama-2-7B")
SEED_TABLE_ROWS = (("full", None, None), ("lora", 8, 16), ("lora", 16, 32), ("lora", 128, 256), ("qlora", 8, 16))
#: What the seed's README claimed, in GB, where known (it gave ~6 GB for LoRA on a 7B model with its defaults).
SEED_CLAIMED = {("lora", 8): "~6"}


def seed_table(device: str = "cuda", dtype: str = "bfloat16", batch_size: int = 4, seq_len: int = 128,
               grad_accum: int = 8) -> list[dict[str, Any]]:
    """Predicted memory of every row of the seed's tables (seed defaults: q/v targets, dropout 0.1, AdamW)."""
    rows = []
    for model in SEED_TABLE_MODELS:
        arch = BUILTIN_ARCHS[model]
        for method, r, alpha in SEED_TABLE_ROWS:
            inp = PlanInput(method=method, r=r or 8, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum,
                            device=device, dtype=dtype)
            plan = plan_memory(arch, inp)
            rows.append({"model": model, "method": method, "r": r, "alpha": alpha, "plan": plan,
                         "seed_claimed": SEED_CLAIMED.get((method, r), "-")})
    return rows


def format_gb(n: float, digits: int = 2) -> str:
    return f"{n / GIB:.{digits}f}"


def format_plan(plan: Plan) -> str:
    """A readable per-component table."""
    inp = plan.inputs
    lines = [f"model {plan.model}: {plan.counts['trainable_params']:,} trainable of {plan.counts['total_params']:,} "
             f"parameters; method {inp.method}, {inp.device} {inp.dtype}, batch {inp.batch_size} x seq "
             f"{inp.seq_len}, accumulation {inp.grad_accum}, {inp.optimizer}"
             f"{', gradient checkpointing' if inp.gradient_checkpointing else ''}",
             f"{'component':<22}{'GiB':>10}"]
    lines += [f"{k:<22}{format_gb(v, 3):>10}" for k, v in plan.components.items()]
    lines.append(f"{'peak (' + plan.peak_phase + ')':<26}{format_gb(plan.peak_bytes, 3):>6}")
    other = [k for k in plan.phases if k != plan.peak_phase][0]
    lines.append(f"({other}: {format_gb(plan.phases[other], 3)} GiB)")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def format_seed_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: predicted peak per seed row next to the seed's claim."""
    first = rows[0]["plan"].inputs
    head = (f"Predicted peak memory (GiB), {first.device} {first.dtype}, block {first.seq_len}, batch "
            f"{first.batch_size}, accumulation {first.grad_accum}, AdamW, targets q_proj,v_proj, dropout 0.1\n\n"
            "| Model | Training type | (r, alpha) | weights | gradients+optimizer | activations+logits | runtime | "
            "predicted peak | seed claimed |\n|---|---|---|---|---|---|---|---|---|")
    out = [head]
    for row in rows:
        c = row["plan"].components
        kind = {"full": "Full", "lora": "LoRA", "qlora": "QLoRA"}[row["method"]]
        cfg = "-" if row["r"] is None else f"({row['r']}, {row['alpha']})"
        weights = c["base_weights"] + c["trainable_weights"]
        optim = c["gradients"] + c["optimizer_states"] + c["optimizer_step_temp"]
        out.append(f"| {row['model']} | {kind} | {cfg} | {format_gb(weights)} | {format_gb(optim)} | "
                   f"{format_gb(c['activations'] + c['logits_ce'])} | {format_gb(c['runtime'])} | "
                   f"{format_gb(row['plan'].peak_bytes)} | {row['seed_claimed']} |")
    out.append("\nweights: frozen base (4-bit NF4 for QLoRA) plus trainable weights; gradients+optimizer: the "
               "gradients held at the peak (all of them, with accumulation) and two fused-AdamW states per trainable "
               "weight. The seed's ~6 GB for LoRA on a 7B model is below the bf16 weights alone.")
    return "\n".join(out)
