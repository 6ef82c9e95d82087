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
Each method supplies its own terms (``Method.plan_terms``: trainable parameters, base-weight bytes, extra
activations, notes); this module never asks for a method by name. The terms of the seed's methods:

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
  plus per token 2 norm statistics and one log-sum-exp per head in fp32 (``a`` is the compute dtype's size; under
  bf16-mixed the norm inputs stay fp32, the residual stream being fp32, and on CPU the attention tensors too, where
  attention runs in fp32). Full fine-tuning adds the inputs the weight
  gradients need: 2h normalized + 2h norm outputs + i (down_proj input), and 3h at the head. LoRA adds per target
  r (fp32) and, with dropout, its output and mask (CPU: 2 d_in fp32; CUDA: d_in fp32 + d_in bool). Gradient
  checkpointing keeps only each layer's input (h) plus one layer recomputed. QLoRA computes activations in fp32.
* **logits/cross-entropy**: with ``chunked_ce`` (the default) the LM head and the loss run over chunks of 1024
  tokens in one reused logits buffer per chunk shape (a full chunk and a batch's last, shorter one), where the
  softmax and its gradient are computed in place: 4 bytes per vocabulary entry per buffered token in fp32; in
  bf16/fp16 the buffer holds 2, plus a chunk's fp32 copy and its cast gradient (6 more); plus the gradient of the
  hidden states (h per token). Without it: 12 bytes per vocabulary entry per token (the logits, the log-softmax
  output and two gradient buffers over every token).

Several processes (``processes`` N > 1; a launched rank reads N from WORLD_SIZE): the plan is one process's peak.

* **ddp**: each process holds everything one process holds, plus DDP's gradient buckets (one more copy of the
  trainable gradients, allocated when DDP wraps the model); activations are one micro-batch of the process.
* **fsdp** (FSDP2 ``fully_shard`` on every decoder layer, then on the root module): base and trainable weights,
  AdamW states and gradients are stored as 1/N dim-0 shards (gradients reduce-scattered after every micro-batch,
  at the master dtype); at the forward/backward peak add two decoder layers all-gathered in the compute dtype (the
  one computing and the one prefetched), the root group (embeddings, final norm, LM head) unsharded in the compute
  dtype (FSDP2 keeps it from forward through backward) and one layer's unsharded gradient of its trainable weights
  at the master dtype. Full fine-tuning without accumulation holds only the head's gradient at that peak, as on
  one process, unsharded (the head is in the root group). Under bf16-mixed (MixedPrecisionPolicy with bf16
  parameters, fp32 reduction) the gathered parameters are already bf16, so autocast's weight copies are not
  counted. The optimizer step holds the shards only. Communication buffers are not counted.

The activation terms were checked against the tensors autograd actually saves (``saved_tensors_hooks``) on
smollm2-135m and tiny random models (tests/test_plan.py). On CPU the measured figure is peak RSS; glibc keeps freed
heap pages, which adds a slack that grows over the first steps and that no formula predicts (on smollm2-135m,
3 steps: full +17 %, LoRA +27 %, QLoRA +40-75 %) unless large allocations are mmapped and returned on free
(``MALLOC_MMAP_THRESHOLD_=131072`` or ``mallopt(M_MMAP_THRESHOLD, 131072)``); see benchmarks/memory_methods.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from peftlab.config import field_default
from peftlab.errors import UserError
from peftlab.methods import get_method
from peftlab.methods.base import DTYPE_BYTES, Method, PlanTerms
from peftlab.plan.arch import Arch, arch_from_config, load_arch
from peftlab.precision import Precision
from peftlab.precision import named as precision_named

GIB = 1024**3
BARE_IMPORT_RSS_GIB = 0.415
RUN_OVERHEAD_GIB = 0.07
CUDA_CONTEXT_GIB = 0.5
CE_BYTES_PER_LOGIT = 12  # unchunked: logits, log-softmax and two gradient buffers, per token and vocabulary entry
CE_CHUNK = 1024  # tokens per chunk of peftlab.losses.chunked_linear_cross_entropy
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
PLANNED_PRECISIONS = ("fp32", "bf16-mixed", "bf16-true")
#: PlanInput fields that describe the run (the rest of a PlanInput's keyword arguments are method fields).
RUN_INPUTS = ("batch_size", "seq_len", "grad_accum", "optimizer", "gradient_checkpointing", "device", "precision",
              "vocab_logits", "chunked_ce", "fused_optimizer", "fp32_attention", "processes", "strategy")
STRATEGIES = ("ddp", "fsdp")
UNSHARDED_LAYERS = 2  # FSDP: the layer computing and the one prefetched are all-gathered at once
#: The seed table's column of each component (every key plan_memory may return).
COMPONENT_GROUPS = {"weights": ("base_weights", "trainable_weights", "unsharded_layers", "root_parameters"),
                    "gradients+optimizer": ("gradients", "layer_gradient", "ddp_gradient_buckets",
                                            "optimizer_states", "optimizer_step_temp"),
                    "activations+logits": ("activations", "logits_ce"), "runtime": ("runtime",)}


@dataclass(init=False)
class PlanInput:
    """What the planner needs to know about a run besides the model's shapes.

    ``fields`` holds the method's field values (defaults filled from the method's fields model); ``user_set``
    names the method fields the user chose (IA3's default targets differ from the fields' default). Keyword
    arguments that are not run inputs are method fields: ``PlanInput(method="lora", r=2)``. Defaults come from
    the config (RunConfig and the method's fields); device and precision are resolved ("cpu", "fp32").
    """

    method: str
    fields: dict[str, Any]
    user_set: tuple[str, ...]
    batch_size: int
    seq_len: int
    grad_accum: int
    optimizer: str
    gradient_checkpointing: bool
    device: str
    precision: str  # fp32 | bf16-mixed | bf16-true (resolved, see peftlab.precision)
    vocab_logits: bool  # a language-modelling head (False: a classifier with few outputs)
    chunked_ce: bool
    fused_optimizer: bool
    fp32_attention: bool
    processes: int  # processes of the run: the plan is one process's peak
    strategy: str  # ddp | fsdp: how several processes hold the model (no effect on one process)

    def __init__(self, method: str | None = None, fields: dict[str, Any] | None = None,
                 user_set: tuple[str, ...] | None = None, **kwargs: Any) -> None:
        self.method = method or field_default("method")
        given = dict(fields or {})
        given.update({k: v for k, v in kwargs.items() if k not in RUN_INPUTS})
        self._method = get_method(self.method)  # looked up once per plan
        declared = self._method.fields
        unknown = sorted(set(given) - set(declared.model_fields))
        if unknown:
            raise UserError(f"plan: method {self.method!r} does not take {', '.join(unknown)}")
        self.fields = declared(**given).model_dump()
        self.user_set = tuple(sorted(given)) if user_set is None else tuple(user_set)
        run = {"batch_size": field_default("batch_size"), "seq_len": field_default("block_size"),
               "grad_accum": field_default("grad_accum"), "optimizer": "adamw",
               "gradient_checkpointing": field_default("gradient_checkpointing"), "device": "cpu",
               "precision": "fp32", "vocab_logits": True, "chunked_ce": field_default("chunked_ce"),
               "fused_optimizer": field_default("fused_optimizer"), "fp32_attention": field_default("fp32_attention"),
               "processes": 1, "strategy": field_default("strategy")}
        run.update({k: v for k, v in kwargs.items() if k in RUN_INPUTS})
        for key, value in run.items():
            setattr(self, key, value)

    @property
    def precision_traits(self) -> Precision:
        """What the precision (a name here) means: its answers, from peftlab.precision."""
        return precision_named(self.precision)

    @property
    def method_object(self) -> Method:
        """The registered method this plan is for (one lookup, in ``__init__``)."""
        return self._method

    @property
    def dtype(self) -> str:
        """The compute dtype: what matmuls and saved activations use."""
        return "bfloat16" if self.precision_traits.is_bf16 else "float32"

    @property
    def master_dtype(self) -> str:
        """The dtype of trainable weights, their gradients and optimizer states (bf16 only under bf16-true)."""
        return "bfloat16" if self.precision_traits.is_bf16_true else "float32"

    @property
    def shards_parameters(self) -> bool:
        """FSDP over several processes: parameters, gradients and optimizer states are split between them."""
        return self.strategy == "fsdp" and self.processes > 1


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
    labels: dict[str, str] = field(default_factory=dict)  # display names of components (default: the key)

    @property
    def peak_bytes(self) -> int:
        return sum(self.components.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, in GiB."""
        return {"model": self.model, "inputs": asdict(self.inputs), "peak_gb": self.peak_bytes / GIB,
                "peak_phase": self.peak_phase,
                "components_gb": {k: v / GIB for k, v in self.components.items()},
                "phases_gb": {k: v / GIB for k, v in self.phases.items()}, "counts": self.counts,
                "notes": self.notes, **({"labels": self.labels} if self.labels else {})}


class NotPlanned(UserError):
    """The method is not modelled by the planner (its ``not_planned`` says why)."""


def method_terms(arch: Arch, inp: PlanInput) -> PlanTerms:
    """The chosen method's plan terms, or :class:`NotPlanned` with its reason."""
    method = inp.method_object
    if method.not_planned is not None:
        raise NotPlanned(f"method {method.name!r} is not modelled by the planner yet: {method.not_planned}")
    return method.plan_terms(arch, inp)


def trainable_params(arch: Arch, inp: PlanInput) -> tuple[int, int]:
    """(trainable parameters, the largest trainable tensor) for a method."""
    terms = method_terms(arch, inp)
    return terms.trainable_params, terms.largest_trainable


def activation_bytes_per_token(arch: Arch, inp: PlanInput, terms: PlanTerms | None = None) -> tuple[int, int]:
    """(bytes saved for backward per token by all layers, of which in one layer), without the logits buffers."""
    terms = terms or method_terms(arch, inp)
    a = inp.method_object.activation_element_bytes(inp)
    h, i, q, kv = arch.hidden_size, arch.intermediate_size, arch.q_dim, arch.kv_dim
    # bf16-mixed keeps the residual stream, so the norm inputs, in fp32; attention on CPU runs in fp32 under bf16
    norm_a = 4 if inp.precision_traits.autocasts else a
    attn_a = 4 if inp.device == "cpu" and inp.precision_traits.is_bf16 and inp.fp32_attention else a
    layer = (norm_a * 2 * h + attn_a * (2 * q + 2 * kv) + a * 3 * i + 4 * (2 + arch.num_heads)
             + terms.activation_bytes_per_token_layer)
    head = a * h + terms.activation_bytes_per_token_head
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


def default_base_bytes(arch: Arch, inp: PlanInput) -> int:
    """A frozen base at the run's precision: bf16-mixed stores the matmul weights in bf16 and keeps embeddings and
    norms fp32 (peftlab.precision.cast_frozen_matmuls); fp32 and bf16-true store everything in one dtype."""
    if inp.precision_traits.stores_base_in_bf16(trainable_base=False):
        matmuls = arch.matmul_params()
        return 2 * matmuls + 4 * (arch.total_params() - matmuls)
    return DTYPE_BYTES[inp.dtype] * arch.total_params()


def plan_memory(arch: Arch, inp: PlanInput, runtime_bytes: int | None = None,
                exact_weights: dict[str, int] | None = None) -> Plan:
    """Predict the peak memory of a run; ``exact_weights`` (base/trainable bytes of a loaded model) override counts."""
    if inp.optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer {inp.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if inp.precision not in PLANNED_PRECISIONS:
        raise UserError(f"precision {inp.precision!r}: choose one of {', '.join(PLANNED_PRECISIONS)}")
    if inp.strategy not in STRATEGIES:
        raise UserError(f"strategy {inp.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if isinstance(inp.processes, bool) or not isinstance(inp.processes, int) or inp.processes < 1:
        raise UserError(f"processes {inp.processes!r}: give a whole number of at least 1")
    method = inp.method_object
    if inp.shards_parameters:
        method.check_supports("fsdp")
    terms = method_terms(arch, inp)
    n_train, largest, pbytes = terms.trainable_params, terms.largest_trainable, terms.trainable_bytes_per_param
    trainable = n_train * pbytes
    base = default_base_bytes(arch, inp) if terms.base_weight_bytes is None else terms.base_weight_bytes
    if exact_weights:
        base, trainable = exact_weights.get("base", base), exact_weights.get("trainable", trainable)
    grads = trainable
    states = {"adamw": 2 * trainable, "adamw8bit": 2 * n_train, "sgd": 0}[inp.optimizer]
    step_temp = trainable if inp.device == "cuda" else 2 * largest * pbytes
    if inp.optimizer == "sgd" or (inp.fused_optimizer and method.optimizer_is_fused):
        step_temp = 0  # fused AdamW updates in place (a method's own optimizer may not be fused)
    tokens = inp.batch_size * inp.seq_len
    per_token, _ = activation_bytes_per_token(arch, inp, terms)
    acts = tokens * per_token + terms.activation_bytes_fixed
    if not inp.shards_parameters:  # FSDP's all-gathered bf16 parameters replace autocast's copies
        acts += terms.autocast_copy_bytes
    act_bytes = method.activation_element_bytes(inp)
    logits = 0
    if inp.vocab_logits and inp.chunked_ce:
        logits = chunked_ce_bytes(tokens, arch.vocab_size, act_bytes) + tokens * arch.hidden_size * act_bytes
    elif inp.vocab_logits:
        logits = CE_BYTES_PER_LOGIT * tokens * arch.vocab_size
    held = grads if terms.gradients_held_bytes is None else terms.gradients_held_bytes
    runtime = runtime_bytes_default(inp.device) if runtime_bytes is None else runtime_bytes
    fixed = {"runtime": runtime, "base_weights": base, "trainable_weights": trainable, "optimizer_states": states}
    fwd = dict(fixed, gradients=held, activations=acts, logits_ce=logits, optimizer_step_temp=0)
    step = dict(fixed, gradients=grads, activations=0, logits_ce=0, optimizer_step_temp=step_temp)
    notes = list(terms.notes)
    labels: dict[str, str] = {}
    if inp.shards_parameters:
        fwd, step, labels = _fsdp_per_process(arch, inp, terms, fwd, step, terms.gradients_held_bytes is None)
        notes.append(_fsdp_note(inp))
    elif inp.processes > 1:
        # DDP's reducer allocates its buckets when it wraps the model: one more copy of the trainable gradients
        fwd["ddp_gradient_buckets"] = step["ddp_gradient_buckets"] = grads
        notes.append(f"ddp on {inp.processes} processes, per process: each holds what one process holds plus "
                     "DDP's gradient buckets (one more copy of the trainable gradients); activations are one "
                     "micro-batch of this process (batch_size per process); the process group's own buffers are not "
                     "counted")
    phases = {"forward_backward": sum(fwd.values()), "optimizer_step": sum(step.values())}
    peak_phase = max(phases, key=phases.get)
    if inp.device == "cuda":
        notes.append("cuda: runtime is the CUDA context (not in torch.cuda.max_memory_*); reserved memory is "
                     "usually 5-20% above allocated")
    counts = {"trainable_params": n_train, "total_params": arch.total_params() + (n_train if method.is_peft else 0),
              "tokens_per_micro_batch": tokens}
    return Plan(model=arch.name, inputs=inp, components=fwd if peak_phase == "forward_backward" else step,
                peak_phase=peak_phase, phases=phases, counts=counts, notes=notes, labels=labels)


def root_params(arch: Arch) -> int:
    """Parameters outside the decoder layers: embeddings, an untied head and the final norm (FSDP's root group)."""
    return arch.embedding_params() + arch.hidden_size


def _fsdp_per_process(arch: Arch, inp: PlanInput, terms: PlanTerms, fwd: dict[str, int], step: dict[str, int],
                      all_grads_held: bool) -> tuple[dict[str, int], dict[str, int], dict[str, str]]:
    """One process's components under FSDP2 as training applies it (the module docstring): every stored
    parameter, gradient and optimizer state split N ways, plus what exists unsharded while layers compute."""
    n = inp.processes
    method = inp.method_object
    compute, master = DTYPE_BYTES[inp.dtype], terms.trainable_bytes_per_param
    layers = arch.num_layers
    # a PEFT method's weights live inside the decoder layers; full fine-tuning also trains the root group
    layer_trainable = (terms.trainable_params - (0 if method.is_peft else root_params(arch))) // layers
    layer_params = (arch.total_params() - root_params(arch)) // layers + (layer_trainable if method.is_peft else 0)
    sharded = ("base_weights", "trainable_weights", "optimizer_states", "optimizer_step_temp")
    out_fwd = {k: (-(-v // n) if k in sharded else v) for k, v in fwd.items()}
    out_step = {k: (-(-v // n) if k in sharded + ("gradients",) else v) for k, v in step.items()}
    # at the activation peak: all sharded gradients (PEFT, accumulation), or only the head's, in the unsharded root
    if all_grads_held:
        out_fwd["gradients"] = -(-fwd["gradients"] // n)
    unsharded = {"unsharded_layers": UNSHARDED_LAYERS * layer_params * compute,
                 "root_parameters": root_params(arch) * compute, "layer_gradient": layer_trainable * master}
    out_fwd.update(unsharded)
    out_step.update(dict.fromkeys(unsharded, 0))  # resharded after backward
    share = f"sharded 1/{n}"
    labels = {"base_weights": f"base weights ({share})", "trainable_weights": f"trainable weights ({share})",
              "optimizer_states": f"optimizer states ({share})",
              "gradients": f"gradients ({share})" if all_grads_held else "gradients (head, unsharded)",
              "optimizer_step_temp": f"optimizer step temp ({share})",
              "unsharded_layers": f"unsharded layers ({UNSHARDED_LAYERS}, all-gather + prefetch)",
              "root_parameters": "root parameters (unsharded)", "layer_gradient": "layer gradient (unsharded)"}
    return out_fwd, out_step, labels


def _fsdp_note(inp: PlanInput) -> str:
    """What the FSDP per-process plan assumes."""
    short = {"float32": "fp32", "bfloat16": "bf16"}
    n, dtype, master = inp.processes, short[inp.dtype], short[inp.master_dtype]
    note = (f"fsdp on {n} processes, per process: FSDP2 fully_shard on every decoder layer and the root; each "
            f"process stores 1/{n} of every parameter, its AdamW states and its gradients ({master}, "
            f"reduce-scattered after every micro-batch); {UNSHARDED_LAYERS} layers all-gathered at a time in "
            f"{dtype} (one computing, one prefetched); the root group (embeddings, final norm, LM head) unsharded "
            f"from forward through backward; one layer's unsharded gradient ({master}) before its reduce-scatter; "
            "activations of one micro-batch of this process (batch_size per process); NCCL buffers not counted")
    if inp.precision_traits.needs_fp32_master:
        note += "; bf16-mixed as MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), no autocast copies"
    if inp.method_object.quantizes_base:
        note += "; a 4-bit base's layers are counted gathered in the compute dtype (an upper bound)"
    return note


def plan_input_from_config(cfg, optimizer: str = "adamw", model_kind: str = "causal_lm",
                           processes: int | None = None) -> PlanInput:
    """PlanInput for a RunConfig (device and precision 'auto' resolve to what is here: CUDA if visible, else CPU;
    bf16-mixed where the device has native bf16). ``processes`` defaults to the launcher's WORLD_SIZE (1 when
    unset), so that a launched rank plans itself."""
    if processes is None:
        processes = world_size()
    from peftlab.precision import Capabilities, for_device, resolve

    device = cfg.device
    if device == "auto":
        device = "cuda" if cuda_here() else "cpu"
    if device == "cuda" and not cuda_here():  # planning for GPUs elsewhere: a bf16 GPU (A100, H100)
        precision = resolve(cfg.precision, Capabilities("cuda", cuda_bf16=True, cuda_name="(assumed)")).name
    else:
        precision = for_device(cfg.precision, device).name
    from peftlab.tasks import get_task

    seq_len = get_task(cfg.task).seq_len(cfg)
    fields = cfg.method_fields()
    return PlanInput(method=cfg.method, fields=fields, user_set=tuple(k for k in fields if cfg.is_set(k)),
                     batch_size=cfg.batch_size, seq_len=seq_len, grad_accum=cfg.grad_accum, optimizer=optimizer,
                     gradient_checkpointing=cfg.gradient_checkpointing, device=device, precision=precision,
                     vocab_logits=model_kind == "causal_lm", chunked_ce=cfg.chunked_ce,
                     fused_optimizer=cfg.fused_optimizer, fp32_attention=cfg.fp32_attention,
                     processes=processes, strategy=cfg.strategy)


def cuda_here() -> bool:
    """Whether this machine has a CUDA device (imports torch)."""
    import torch

    return torch.cuda.is_available()


def world_size() -> int:
    """The launcher's WORLD_SIZE (torchrun, accelerate), 1 outside a launched run."""
    value = os.environ.get("WORLD_SIZE", "").strip()
    if not value:
        return 1
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"WORLD_SIZE={value!r} is not a whole number") from None
    if n < 1:
        raise UserError(f"WORLD_SIZE={value!r}: expected at least 1")
    return n


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
    from peftlab.tasks import get_task

    model_kind = get_task(cfg.task).model_kind
    try:
        arch = arch_from_config(getattr(base_model, "config", config), cfg.model)
        inp = plan_input_from_config(cfg, model_kind=model_kind)
        plan = plan_memory(arch, inp, exact_weights=loaded_weight_bytes(model))
    except UserError as exc:
        return {"available": False, "reason": str(exc), "model": name}
    out = plan.as_dict()
    out["available"] = True
    out["measured_kind"] = "cuda_max_allocated (+context)" if inp.device == "cuda" else "cpu_peak_rss_train"
    return out


def plan_for_config(cfg, model: str | None = None, optimizer: str = "adamw", runtime_bytes: int | None = None,
                    processes: int | None = None) -> Plan:
    """Plan a RunConfig's run without loading weights (one process's peak on ``processes``, default WORLD_SIZE)."""
    arch = load_arch(model or cfg.model)
    from peftlab.tasks import get_task

    model_kind = get_task(cfg.task).model_kind
    return plan_memory(arch, plan_input_from_config(cfg, optimizer, model_kind, processes), runtime_bytes=runtime_bytes)


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


def format_gb(n: float, digits: int = 2) -> str:
    return f"{n / GIB:.{digits}f}"


def format_plan(plan: Plan) -> str:
    """A readable per-component table."""
    inp = plan.inputs
    lines = [f"model {plan.model}: {plan.counts['trainable_params']:,} trainable of {plan.counts['total_params']:,} "
             f"parameters; method {inp.method}, {inp.device} {inp.precision}, batch {inp.batch_size} x seq "
             f"{inp.seq_len}, accumulation {inp.grad_accum}, {inp.optimizer}"
             f"{', gradient checkpointing' if inp.gradient_checkpointing else ''}"
             f"{f', {inp.strategy} on {inp.processes} processes (per process)' if inp.processes > 1 else ''}"]
    names = {k: plan.labels.get(k, k) for k in plan.components}
    width = max(22, *(len(v) + 2 for v in names.values()))
    lines.append(f"{'component':<{width}}{'GiB':>10}")
    lines += [f"{names[k]:<{width}}{format_gb(v, 3):>10}" for k, v in plan.components.items()]
    lines.append(f"{'peak (' + plan.peak_phase + ')':<{width + 4}}{format_gb(plan.peak_bytes, 3):>6}")
    other = [k for k in plan.phases if k != plan.peak_phase][0]
    lines.append(f"({other}: {format_gb(plan.phases[other], 3)} GiB)")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


