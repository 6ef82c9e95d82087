"""RunConfig: every run-level knob of one run, with the seed's defaults.

This module imports neither torch nor the registries. A method's own fields (r, alpha...) are declared by the
method (``peftlab.methods``) and carried as RunConfig extras. Configs are built and validated against the
registries in one place, :mod:`peftlab.configure` (``load_config``, ``build_config``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from peftlab.errors import UserError

#: Run-level fields that change what a run computes. A checkpoint whose config differs in one of these, or in a
#: method field (every method field defines a run: see :func:`defining_fields`), cannot be resumed by this config;
#: every other field (logging, eval cadence...) may differ.
RUN_DEFINING_FIELDS = (
    "model", "revision", "precision", "task", "dataset", "eval_dataset", "text_column", "text_pair_column",
    "label_column", "block_size", "max_length", "train_subset", "method", "lr", "epochs", "max_steps",
    "batch_size", "grad_accum", "warmup_ratio", "warmup_steps", "scheduler", "weight_decay", "max_grad_norm",
    "seed", "prompt_template", "packing", "gradient_checkpointing", "strategy", "chat_loss", "chat_format",
)


class RunConfig(BaseModel):
    """One fine-tuning run. Defaults are the seed repository's."""

    # extra="allow": the chosen method's fields (r, alpha...) are extras, validated and default-filled by the
    # method's fields model in peftlab.configure, so that `cfg.r` works for LoRA and this module needs no registry.
    model_config = ConfigDict(extra="allow", validate_assignment=True)

    # --- model -------------------------------------------------------------------------------------------
    model: str = Field("smollm2-135m", description="Hub id, local folder, or alias (smollm2-135m, minilm-l6, "
                       "tiny-llama, tiny-mistral).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Run model code from the hub. Off unless you trust it.")
    allow_pickle: bool = Field(False, description="Allow pickle-based .bin/.pt weights (unsafe: can run code).")
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16-true"] = Field(
        "auto", description="fp32 | bf16-mixed (bf16 matmuls, fp32 trainable weights and optimizer states) | "
        "bf16-true (everything bf16) | auto (bf16-mixed on CUDA with bf16 and on CPUs with native bf16, else fp32).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Several processes: ddp (a full copy per process) | fsdp (PyTorch FSDP2: parameters, "
        "gradients and optimizer states sharded over the processes; full and the LoRA family).")

    # --- task and data -------------------------------------------------------------------------------------
    task: str = Field("clm", description="Task (each declares its own settings: peftlab.tasks).")
    dataset: str = Field("wikitext-2-raw-v1", description="Dataset name, hub id, or a local file.")
    eval_dataset: str | None = Field(None, description="Evaluation dataset or file (default: the dataset's "
                                     "evaluation split).")
    eval_split: str | None = Field(None, description="Evaluation split of a named dataset (default: its "
                                   "validation split; 'test' when training offline on WikiText-2 validation).")
    data_dir: str | None = Field(None, description="Offline mirror of datasets (default: $PEFTLAB_DATA_DIR).")
    text_column: str = Field("text", description="Column holding the text.")
    text_pair_column: str | None = Field(None, description="Second text column for pair classification.")
    label_column: str = Field("label", description="Column holding the class label (classification).")
    block_size: int = Field(128, gt=0, description="Tokens per block (clm).")
    max_length: int = Field(256, gt=0, description="Maximum tokens per example (classification, instruction).")
    train_subset: int | None = Field(None, gt=0, description="Use only the first N training blocks/examples.")
    eval_subset: int | None = Field(None, gt=0, description="Use only the first N evaluation blocks/examples.")
    prompt_template: Literal["auto", "alpaca", "chat"] = Field(
        "auto", description="Instruction prompt: the model's chat template if it has one (auto), or Alpaca.")
    packing: bool = Field(False, description="Pack instruction examples into full sequences instead of padding.")
    chat_loss: Literal["all", "last"] = Field(
        "all", description="Chat records: learn every assistant turn (all) or only the last one (last).")
    chat_format: Literal["auto", "messages", "sharegpt"] = Field(
        "auto", description="Chat data layout: 'messages' ({role, content}), 'sharegpt' ('conversations' of "
        "{from, value}), or auto (by the column present).")
    max_new_tokens: int = Field(64, gt=0, description="Generation length for samples and generation metrics.")
    generation_subset: int | None = Field(None, gt=0, description="Examples scored by generation (instruction).")

    # --- method (its own fields are declared by the method: peftlab.methods, validated by peftlab.configure) ---
    method: str = Field("lora", description="Fine-tuning method; each takes its own fields (README: Methods).")

    # --- optimisation --------------------------------------------------------------------------------------
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    epochs: int = Field(1, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(4, gt=0, description="Examples per micro-batch (per process).")
    eval_batch_size: int | None = Field(None, gt=0, description="Examples per evaluation batch (default: "
                                        "batch_size).")
    generation_batch_size: int | None = Field(None, gt=0, description="Prompts per greedy-generation batch, "
                                              "left-padded (default: eval_batch_size); generation is cheap per "
                                              "prompt, so larger batches than training's cut evaluation time.")
    grad_accum: int = Field(8, gt=0, description="Micro-batches per optimizer step.")
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="LR schedule after warmup.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps for linear warmup.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps (overrides warmup_ratio).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm (null: off).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    seed: int = Field(42, description="Seed for weights init, data order and dropout.")

    # --- speed ---------------------------------------------------------------------------------------------
    chunked_ce: bool = Field(True, description="Run the LM head and cross-entropy in token chunks (no full "
                             "logits tensor); off: the plain logits path.")
    fused_optimizer: bool = Field(True, description="Fused AdamW kernel (one kernel over all parameters); off: "
                                  "torch's default foreach implementation.")
    compile: bool = Field(False, description="torch.compile the model (inductor); off by default.")
    fp32_attention: bool = Field(True, description="Under bf16 precisions on CPU, compute attention in fp32 "
                                 "(CPU's bf16 attention backward is several times slower); no effect on CUDA.")
    threads: int | None = Field(None, gt=0, description="torch intra-op threads (default: torch's choice).")

    # --- output, logging, checkpoints -----------------------------------------------------------------------
    output_dir: str | None = Field(None, description="Run directory (default: runs/<model>-<task>-<method>-<time>).")
    overwrite: bool = Field(False, description="Replace a finished run in output_dir.")
    logging_steps: int = Field(1, gt=0, description="Optimizer steps between metrics.jsonl lines.")
    eval_before: bool = Field(True, description="Evaluate the base model before training (baseline).")
    benchmarks: list[str] = Field([], description="General-ability benchmarks (lm-evaluation-harness), before "
                                  "and after training: a comma list of shipped names (arc_easy, arc_challenge, piqa, "
                                  "hellaswag, winogrande, boolq), other lm-eval task names, or task YAML files.")
    benchmark_limit: int | None = Field(None, gt=0, description="Score only the first N items of each benchmark.")
    save_every: int | None = Field(None, gt=0, description="Checkpoint every N optimizer steps.")
    keep_last: int = Field(2, gt=0, description="Checkpoints kept.")
    keep_best: bool = Field(False, description="Also keep the checkpoint with the best eval metric.")
    resume: str | None = Field(None, description="'auto' (newest valid checkpoint in output_dir) or a path.")
    max_rss_gb: float | None = Field(None, gt=0, description="CPU: stop with advice before RSS exceeds this.")
    sample_prompt: str = Field("The history of the city", description="Prompt for the stored sample generation.")

    #: The method fields the user gave (the extras hold defaults too), set by :func:`peftlab.configure.build_config`.
    _user_set: frozenset[str] = PrivateAttr(default_factory=frozenset)

    # --- ecosystem: trackers and data files ---
    report_to: list[str] = Field(["none"], description="Experiment trackers: none | tensorboard | mlflow | wandb | "
                                 "trackio | all, or a comma list (pip install 'peftlab[tracking]').")
    tracking_dir: str | None = Field(None, description="Trackers' local log folder (default: <run dir>/tracking).")
    tracking_project: str | None = Field(None, description="Tracker experiment/project (default: peftlab; a sweep "
                                         "sets its own name).")
    header: bool = Field(True, description="CSV/TSV: the first row names the columns; false: columns are named "
                         "by 0-based index (--text-column 2 --label-column 0).")
    encoding: str = Field("utf-8", description="Text encoding of local data files (any Python codec, e.g. latin-1).")

    @field_validator("report_to", mode="before")
    @classmethod
    def _split_trackers(cls, value: Any) -> Any:
        from peftlab.tracking import parse_report_to

        return parse_report_to(value)

    @field_validator("benchmarks", mode="before")
    @classmethod
    def _split_benchmarks(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        import codecs

        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"{value!r} is not a Python codec; use e.g. latin-1, cp1252 or utf-16") from None
        return value


    def method_fields(self) -> dict[str, Any]:
        """The chosen method's field values (defaults filled): the config's extra fields."""
        return dict(self.model_extra or {})

    def is_set(self, name: str) -> bool:
        """Whether the user set this field (a default kept is not set), e.g. target_modules."""
        if name in type(self).model_fields:
            return name in self.model_fields_set
        return name in self._user_set

    def defining_subset(self) -> dict[str, Any]:
        """The fields that decide what the run computes (used to check resumes and sweep stores)."""
        return defining_fields(self.model_dump())


def defining_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """The run-defining part of a config dict (e.g. results.json's "config"): RUN_DEFINING_FIELDS plus every method
    field (the keys that are not RunConfig fields). A field that an older record lacks counts as its default, so
    runs recorded before the field existed (``chat_loss``, ``chat_format``) are still adopted and grouped."""
    out = {k: config[k] if k in config else field_default(k) for k in RUN_DEFINING_FIELDS}
    out.update({k: v for k, v in config.items() if k not in RunConfig.model_fields})
    return out


def run_field_names() -> list[str]:
    """The run-level config field names (method fields are the methods': peftlab.configure.config_field_names)."""
    return list(RunConfig.model_fields)


def field_default(name: str) -> Any:
    """A run field's default (CLI help and the planner read defaults from here)."""
    return RunConfig.model_fields[name].get_default(call_default_factory=True)


def validation_messages(err: ValidationError) -> list[str]:
    """Each pydantic error as a short phrase naming the field ("field 'r': ... (got 0)")."""
    out = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if "input" in e and not isinstance(e["input"], dict) and e["loc"]:
            out.append(f"field {field!r}: {msg} (got {e['input']!r})")
        else:
            out.append(msg)
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {str(p)!r} does not exist; check the path given to --config")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        detail = str(exc).splitlines()[0]
        raise UserError(f"config file {str(p)!r} is not valid YAML ({detail}); fix its syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {str(p)!r} must hold a mapping of field: value, not {type(data).__name__}")
    return data
