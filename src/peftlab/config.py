"""RunConfig: every knob of one run, with the seed's defaults, validated before any heavy work.

A config comes from YAML (``--config``) and CLI overrides; both pass through :func:`load_config`,
which turns pydantic's errors into one actionable line (:class:`~peftlab.errors.UserError`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from peftlab.errors import UserError

#: Fields that change what a run computes. A checkpoint whose config differs in one of these
#: cannot be resumed by this config; every other field (logging, eval cadence...) may differ.
RUN_DEFINING_FIELDS = (
    "model", "revision", "dtype", "task", "dataset", "eval_dataset", "text_column", "text_pair_column",
    "label_column", "block_size", "max_length", "train_subset", "method", "r", "alpha", "dropout",
    "target_modules", "bias", "loraplus_lr_ratio", "num_virtual_tokens", "lr", "epochs", "max_steps",
    "batch_size", "grad_accum", "warmup_ratio", "warmup_steps", "scheduler", "weight_decay", "max_grad_norm",
    "seed", "prompt_template", "packing", "gradient_checkpointing",
)


class RunConfig(BaseModel):
    """One fine-tuning run. Defaults are the seed repository's."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- model -------------------------------------------------------------------------------------------
    model: str = Field("smollm2-135m", description="Hub id, local folder, or alias (smollm2-135m, minilm-l6, "
                       "tiny-llama, tiny-mistral).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Run model code from the hub. Off unless you trust it.")
    allow_pickle: bool = Field(False, description="Allow pickle-based .bin/.pt weights (unsafe: can run code).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights/compute dtype. auto = float32 on CPU, bfloat16 on CUDA.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")

    # --- task and data -------------------------------------------------------------------------------------
    task: str = Field("clm", description="clm | classification | instruction.")
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
    max_new_tokens: int = Field(64, gt=0, description="Generation length for samples and generation metrics.")
    generation_subset: int | None = Field(None, gt=0, description="Examples scored by generation (instruction).")

    # --- method --------------------------------------------------------------------------------------------
    method: str = Field("lora", description="full | lora | qlora | dora | rslora | pissa | loraplus | ia3 | prefix.")
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: float = Field(16, gt=0, description="LoRA alpha (scaling = alpha / r; alpha / sqrt(r) for rslora).")
    dropout: float = Field(0.1, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(["q_proj", "v_proj"], min_length=1,
                                      description="Module names that get adapters.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train (LoRA).")
    loraplus_lr_ratio: float = Field(16.0, gt=0, description="LoRA+: learning-rate ratio of B to A.")
    num_virtual_tokens: int = Field(20, gt=0, description="Prefix tuning: virtual tokens per layer.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="QLoRA: 4-bit data type.")
    double_quant: bool = Field(True, description="QLoRA: quantize the quantization constants too.")

    # --- optimisation --------------------------------------------------------------------------------------
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    epochs: int = Field(1, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(4, gt=0, description="Examples per micro-batch (per process).")
    eval_batch_size: int | None = Field(None, gt=0, description="Examples per evaluation batch (default: "
                                        "batch_size).")
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
    threads: int | None = Field(None, gt=0, description="torch intra-op threads (default: torch's choice).")

    # --- output, logging, checkpoints -----------------------------------------------------------------------
    output_dir: str | None = Field(None, description="Run directory (default: runs/<model>-<task>-<method>-<time>).")
    overwrite: bool = Field(False, description="Replace a finished run in output_dir.")
    logging_steps: int = Field(1, gt=0, description="Optimizer steps between metrics.jsonl lines.")
    eval_before: bool = Field(True, description="Evaluate the base model before training (baseline).")
    save_every: int | None = Field(None, gt=0, description="Checkpoint every N optimizer steps.")
    keep_last: int = Field(2, gt=0, description="Checkpoints kept.")
    keep_best: bool = Field(False, description="Also keep the checkpoint with the best eval metric.")
    resume: str | None = Field(None, description="'auto' (newest valid checkpoint in output_dir) or a path.")
    max_rss_gb: float | None = Field(None, gt=0, description="CPU: stop with advice before RSS exceeds this.")
    sample_prompt: str = Field("The history of the city", description="Prompt for the stored sample generation.")

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

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        import codecs

        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"{value!r} is not a Python codec; use e.g. latin-1, cp1252 or utf-16") from None
        return value

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        from peftlab.tasks import TASKS

        if value not in TASKS:
            raise ValueError(f"unknown task {value!r}; choose one of {', '.join(sorted(TASKS))}")
        return value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from peftlab.methods import METHODS

        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; choose one of {', '.join(sorted(METHODS))}")
        return value

    @model_validator(mode="after")
    def _method_fields_apply(self) -> RunConfig:
        from peftlab.methods import METHOD_FIELDS, METHODS

        accepted = METHODS[self.method].fields
        wrong = sorted(f for f in self.model_fields_set & METHOD_FIELDS if f not in accepted)
        if wrong:
            takes = ", ".join(sorted(accepted)) or "no method fields"
            raise ValueError(f"method {self.method!r} does not take {', '.join(wrong)} (it takes {takes}); "
                             f"remove {'them' if len(wrong) > 1 else 'it'}")
        return self

    def defining_subset(self) -> dict[str, Any]:
        """The fields that decide what the run computes (used to check resumes and sweep stores)."""
        dumped = self.model_dump()
        return {k: dumped[k] for k in RUN_DEFINING_FIELDS}


def config_field_names() -> list[str]:
    """All accepted config field names."""
    return list(RunConfig.model_fields)


def suggest_field(name: str) -> str:
    """' (did you mean 'x'?)' for a misspelt field name, or ''."""
    close = difflib.get_close_matches(name, config_field_names(), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def format_validation_error(err: ValidationError, source: str) -> str:
    """Turn the first pydantic error into one actionable line naming the field."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown config field {field!r}{suggest_field(field)}; see `peftlab train --help`"
    msg = first["msg"].removeprefix("Value error, ")
    if "input" in first and not isinstance(first["input"], dict) and first["loc"]:
        return f"{source}: field {field!r}: {msg} (got {first['input']!r})"
    return f"{source}: {msg}"


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


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Merge a YAML file and overrides (overrides win) into a validated RunConfig."""
    data: dict[str, Any] = read_yaml(path) if path else {}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    source = str(path) if path else "command line"
    try:
        return RunConfig(**data)
    except ValidationError as err:
        raise UserError(format_validation_error(err, source)) from None
