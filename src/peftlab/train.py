"""One fine-tuning run as a recipe: :class:`Run`, built once from the config, then its steps in order.

``Run(cfg)`` decides everything that is fixed for the run (method, task, strategy, device, accelerator, run folder,
the checkpoint to resume) and reads the raw data, so that bad input fails before any heavy work. Its steps:

``load`` (model + method) -> ``baseline`` (evaluation before training, or the resumed state) -> ``fit``
(:class:`peftlab.loop.TrainLoop`) -> ``final_eval`` (metrics and a sample) -> ``save`` (adapter or model,
artefacts) -> ``build_record`` (a pure function of the run's state) -> results.json, the model card, the trackers.

:func:`run_training` runs them and returns the :class:`~peftlab.record.RunRecord` it wrote.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab import model_card, tracking
from peftlab.baseline import evaluate_before
from peftlab.checkpoint import check_compatible, resolve_resume
from peftlab.config import RunConfig
from peftlab.errors import ResourceError, TrainingDiverged, UserError
from peftlab.evals import BenchmarkStages
from peftlab.loop import OOM_ADVICE, LoopState, Resume, TrainLoop
from peftlab.measure import MemoryMeter, PhasePeak, Stopwatch, folder_size_bytes, parameter_counts
from peftlab.methods import Method, get_method
from peftlab.models import LoadedModel, load_model, resolve_device, resolve_precision
from peftlab.per_example import write_stage
from peftlab.plan.memory import estimate_for_run
from peftlab.portable import name_portable_base, portable_base_name
from peftlab.precision import Precision, compute_context
from peftlab.record import (
    RESULTS_SCHEMA,
    Artifact,
    Memory,
    MethodInfo,
    Metrics,
    ModelInfo,
    RunDir,
    RunRecord,
    TaskInfo,
    Timing,
    git_commit,
    machine_info,
    package_versions,
)
from peftlab.strategies import Strategy, get_strategy
from peftlab.summary import format_result_row
from peftlab.tasks import Evaluation, Task, get_task


# --- before the model loads: what can refuse the run ---------------------------------------------------------------
def check_can_train(method: Method, task: Task, strategy: Strategy, device: torch.device,
                    precision: Precision) -> None:
    """Refuse, in one line and before the model loads, what the method, strategy or precision cannot train."""
    method.check_supports(method.task_capability(task.model_kind))
    strategy.check(method, device)
    if precision.is_bf16_true:
        method.check_supports("bf16_true")


def make_accelerator(device: torch.device):
    """accelerate's Accelerator for this launch, refusing the launchers peftlab's loop does not drive."""
    from accelerate import Accelerator

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise UserError("accelerate's FSDP plugin: peftlab applies FSDP2 itself; launch with a multi-process "
                        "accelerate config (examples/accelerate/fsdp2.yaml) and pass --strategy fsdp to peftlab "
                        "(docs/distributed.md)")
    # cpu=True whenever training runs on CPU (also for device "auto" without CUDA): under torchrun this is what
    # makes accelerate join the gloo process group (MULTI_CPU) instead of running each rank alone.
    accelerator = Accelerator(cpu=device.type == "cpu")
    if accelerator.distributed_type.name in ("DEEPSPEED", "MEGATRON_LM"):
        raise UserError(f"{accelerator.distributed_type.name} is not supported by peftlab's loop; launch with "
                        "torchrun or `accelerate launch --multi_gpu`, with --strategy ddp or fsdp "
                        "(docs/distributed.md)")
    return accelerator


def find_resume(cfg: RunConfig) -> Resume | None:
    """The checkpoint --resume names, checked before any heavy work: it must exist and match this config."""
    if not cfg.resume:
        return None
    if not cfg.output_dir:
        raise UserError("--resume needs --output-dir: the run directory that holds the checkpoints")
    run_path = RunDir.open_for(cfg, is_writer=False).path
    folder = resolve_resume(cfg.resume, run_path, cfg.allow_pickle)
    return Resume(folder, check_compatible(folder, cfg))


# --- model ---------------------------------------------------------------------------------------------------------
def prepare_model(cfg: RunConfig, task: Task, method: Method,
                  model_kwargs: dict[str, Any] | None = None) -> tuple[LoadedModel, nn.Module]:
    """Check, load and wrap the model for a config outside a :class:`Run` (tests, benchmarks)."""
    device = resolve_device(cfg.device)
    check_can_train(method, task, get_strategy(cfg.strategy), device, resolve_precision(cfg, device))
    return load_and_wrap(cfg, task, method, model_kwargs)


def load_and_wrap(cfg: RunConfig, task: Task, method: Method,
                  model_kwargs: dict[str, Any] | None = None) -> tuple[LoadedModel, nn.Module]:
    """Load the base model for the task (``model_kwargs``: ``task.model_kwargs(raw)``) and wrap it with the method.

    The base model's newly initialised modules (a classification head) are trained and saved with the adapter.
    """
    loaded = load_model(cfg, model_kind=task.model_kind, quantize_4bit=method.quantizes_base,
                        trainable_base=not method.is_peft, **(model_kwargs or {}))
    torch.manual_seed(cfg.seed)  # adapter initialisation
    model = method.apply(loaded.model, cfg, task.model_kind, loaded.new_modules)
    if loaded.precision.is_bf16_true:  # peft keeps adapters fp32 over a bf16 base; bf16-true means all bf16
        for param in model.parameters():
            if param.requires_grad and param.is_floating_point():
                param.data = param.data.to(torch.bfloat16)
    if cfg.gradient_checkpointing and not method.quantizes_base:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method.is_peft and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if cfg.compile:
        model = torch.compile(model)
    return loaded, model


def save_trained(model: nn.Module, loaded: LoadedModel, method: Method, run: RunDir, accelerator,
                 strategy: Strategy) -> Path:
    """Save the adapter (peft format) or, for full fine-tuning, the whole model with its tokenizer.

    Rank 0 writes; a sharded model is first gathered onto rank 0 (a collective: every rank calls this)."""
    model = accelerator.unwrap_model(model)
    target = run.path / ("adapter" if method.is_peft else "model")
    gathered = strategy.final_state_dict(model, trainable_only=method.is_peft)
    if accelerator.is_main_process:
        kwargs = method.save_kwargs(run.path)
        if gathered is not None:
            kwargs["state_dict"] = gathered
        model.save_pretrained(target, safe_serialization=True, **kwargs)
        name_portable_base(target, loaded)  # adapter_config.json names the hub id, not this machine's cache
        loaded.tokenizer.save_pretrained(target)
    accelerator.wait_for_everyone()
    return target


def train_peaks_per_process(peak: PhasePeak, accelerator, device: torch.device) -> list[dict[str, float | None]]:
    """Every process's training peaks (rank order), gathered on all ranks; rank 0's alone on one process."""
    keys = ("cpu_peak_rss_gb", "cuda_max_allocated_gb", "cuda_max_reserved_gb")
    mine = [getattr(peak, k) for k in keys]
    if accelerator.num_processes == 1:
        return [dict(zip(keys, mine, strict=True))]
    values = torch.tensor([[float("nan") if v is None else v for v in mine]], dtype=torch.float64, device=device)
    gathered = accelerator.gather(values).cpu().tolist()
    return [{k: (None if v != v else v) for k, v in zip(keys, row, strict=True)} for row in gathered]


def adapter_targets(model: nn.Module) -> list[str] | None:
    """The modules the adapter was actually applied to (from peft's config), if any."""
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        return None
    targets = getattr(next(iter(peft_config.values())), "target_modules", None)  # prefix tuning has none
    return sorted(targets) if targets else None


@dataclass(frozen=True)
class Provenance:
    """When the run finished and what it ran on: read once, at the end, for the record."""

    finished: str
    versions: dict[str, str | None]
    git_commit: str | None
    machine: dict[str, Any]

    @classmethod
    def now(cls) -> Provenance:
        return cls(dt.datetime.now(dt.UTC).isoformat(), package_versions(), git_commit(), machine_info())


# --- the run -------------------------------------------------------------------------------------------------------
class Run:
    """One fine-tuning run. Built once from the config; :meth:`execute` runs the steps in order (see the module)."""

    def __init__(self, cfg: RunConfig) -> None:
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.method = get_method(cfg.method)
        self.task = get_task(cfg.task)(cfg)
        self.raw = self.task.load()  # missing files, empty data and bad columns fail here, before the model loads
        self.benchmarks = BenchmarkStages.for_config(cfg)  # bad benchmark names or files too (peftlab.evals)
        self.strategy = get_strategy(cfg.strategy)
        self.device = resolve_device(cfg.device)
        self.accelerator = make_accelerator(self.device)
        self.resume = find_resume(cfg)
        self.run_dir = RunDir.open_for(cfg, is_writer=self.accelerator.is_main_process,
                                       resuming=self.resume is not None)
        if self.resume is not None:
            self.run_dir.truncate_metrics(after_step=self.resume.saved["loop"]["step"])
        self.started = dt.datetime.now(dt.UTC)
        set_seed(cfg.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.meter = MemoryMeter(self.device)
        self.load_timer, self.eval_timer = Stopwatch(), Stopwatch(self.device)
        self.state = LoopState()
        self.before: Evaluation | None = None  # its per-example outputs go into the artifacts (not kept on resume)

    def execute(self) -> RunRecord:
        """Every step in order; a failure marks the run failed (failed.json) and is raised as a one-line error."""
        try:
            tracking.start(self.accelerator, self.cfg, self.run_dir.path)  # a missing tracker fails before the model
            self.load()
            self.baseline()
            self.fit()
            self.final_eval()
            self.save()
            return self.publish(self.build_record())
        except TrainingDiverged as exc:
            self.run_dir.fail(str(exc), {"step": exc.step})
            raise UserError(f"training stopped: {exc}; lower --lr, check the data, or keep --max-grad-norm on. "
                            f"The run is marked failed in {self.run_dir.path}") from None
        except torch.OutOfMemoryError:
            self.run_dir.fail("out of memory")
            raise ResourceError(f"out of memory while training; {OOM_ADVICE}") from None
        except UserError as exc:
            self.run_dir.fail(str(exc))
            raise
        except BaseException as exc:
            self.run_dir.fail(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            tracking.finish(self.accelerator)

    # --- the steps ------------------------------------------------------------------------------------------------
    def load(self) -> None:
        """The model wrapped by the method, and the prepared data (timed and metered as the load phase)."""
        self.precision = resolve_precision(self.cfg, self.device)
        check_can_train(self.method, self.task, self.strategy, self.device, self.precision)
        self.load_timer.start()
        self.meter.start("load")
        self.loaded, self.model = load_and_wrap(self.cfg, self.task, self.method, self.task.model_kwargs(self.raw))
        if self.accelerator.is_main_process:
            self.method.before_training_save(self.model, self.run_dir.path)  # PiSSA: its initial adapter
        self.data = self.task.prepare(self.raw, self.loaded.tokenizer, self.model)
        self.meter.stop()
        self.load_timer.stop()
        self.params = parameter_counts(self.model)
        if self.accelerator.is_main_process:
            print(f"trainable params: {self.params['trainable_params']:,} of {self.params['total_params']:,} "
                  f"({self.params['trainable_percent']:.4f}%)", file=sys.stderr)

    def baseline(self) -> None:
        """A resumed run takes its saved loop state; a new one evaluates the model before training (shared by runs
        with the same baseline key, see peftlab.baseline)."""
        if self.resume is not None:
            self.state = LoopState(**self.resume.saved["loop"])
            self.benchmarks.restore("before", self.run_dir.path)  # written before the interruption
            return
        if not self.cfg.eval_before:
            return
        self.benchmarks.score("before", self.model, self.loaded, self.run_dir.path, write=self.run_dir.is_writer)
        self.eval_timer.start()
        with compute_context(self.precision, self.device.type):
            self.before = evaluate_before(self.cfg, self.task, self.data, self.model, self.loaded, self.method,
                                          self.run_dir)
        self.state.before = self.before.metrics
        self.eval_timer.stop()
        tracking.log_eval(self.accelerator, self.state.before, 0, "eval_before")

    def fit(self) -> None:
        """The optimizer loop (peftlab.loop), metered as the train phase on every process."""
        self.meter.start("train")
        loop = TrainLoop(self, self.data, self.state)
        loop.prepare(self.model, self.resume)
        self.state = loop.run()
        self.per_process = train_peaks_per_process(self.meter.stop(), self.accelerator, self.device)

    def final_eval(self) -> None:
        """The metrics after training (timed) and the task's sample output."""
        trained = self.accelerator.unwrap_model(self.model)
        self.eval_timer.start()
        with compute_context(self.precision, self.device.type):
            self.final = self.task.evaluate(self.data, trained, "after")
        self.eval_timer.stop()
        self.benchmarks.score("after", trained, self.loaded, self.run_dir.path, write=self.run_dir.is_writer)
        with compute_context(self.precision, self.device.type):
            self.sample = self.task.sample(self.data, trained, self.final)

    def save(self) -> None:
        """The adapter (or model), the task's artefacts and per-example values; then what the record states about
        them and about this machine."""
        self.saved = save_trained(self.model, self.loaded, self.method, self.run_dir, self.accelerator, self.strategy)
        if self.run_dir.is_writer:  # only rank 0 writes files
            self.task.write_artifacts(self.data, self.run_dir.path, self.final, self.before)
            write_stage(self.run_dir.path, self.task.name, self.final)  # per-example values, for intervals
        self.estimate = estimate_for_run(self.cfg, self.accelerator.unwrap_model(self.model))
        self.saved_bytes = folder_size_bytes(self.saved) if self.saved.exists() else None
        self.provenance = Provenance.now()

    def publish(self, record: RunRecord) -> RunRecord:
        """results.json (last, atomically), the model card, the result row and the trackers' final values."""
        self.run_dir.finish(record)
        if self.accelerator.is_main_process:
            model_card.write_card(self.saved, record)  # replaces peft's placeholder README.md
            print(format_result_row(record))
        tracking.log_results(self.accelerator, record)
        return record

    # --- the record: a pure function of the run's state -------------------------------------------------------------
    def build_record(self) -> RunRecord:
        """The run's results.json, from what the steps measured and decided."""
        cfg, state, task = self.cfg, self.state, self.task
        return RunRecord(
            schema_version=RESULTS_SCHEMA,
            status="done",
            run_dir=str(self.run_dir.path),
            started=self.started.isoformat(),
            finished=self.provenance.finished,
            config=cfg.model_dump(mode="json"),
            model=self.model_info(),
            method=self.method_info(),
            task=TaskInfo(name=task.name, metric=task.metric, higher_is_better=task.higher_is_better),
            data=task.info(self.data),
            params=self.params,
            metrics=Metrics(before=state.before, after=self.final.metrics, per_epoch=state.epoch_evals,
                            final_train_loss=state.history[-1]["loss"] if state.history else None),
            timing=self.timing(),
            memory=self.memory(),
            artifact=Artifact(path=str(self.saved), kind="adapter" if self.method.is_peft else "model",
                              size_bytes=self.saved_bytes),
            sample=self.sample,
            seed=cfg.seed,
            versions=self.provenance.versions,
            git_commit=self.provenance.git_commit,
            machine=self.provenance.machine,
            resumed=self.resume is not None,
            resumed_from=str(self.resume.folder) if self.resume else None,
            **self.benchmarks.record(),
        )

    def model_info(self) -> ModelInfo:
        loaded = self.loaded
        return ModelInfo(name=self.cfg.model, source=loaded.source, architecture=type(loaded.model).__name__,
                         adapter_base=portable_base_name(self.cfg.model, loaded.source),
                         dtype=str(loaded.dtype).removeprefix("torch."), device=str(self.device),
                         precision=self.precision.name, precision_reason=self.precision.reason)

    def method_info(self) -> MethodInfo:
        fields = self.cfg.method_fields()
        return MethodInfo(name=self.method.name, summary=self.method.summary, fields=fields, r=fields.get("r"),
                          alpha=fields.get("alpha"), target_modules=adapter_targets(self.model))

    def timing(self) -> Timing:
        state = self.state
        train_time = state.train_seconds()
        epoch_fraction = state.step / state.steps_per_epoch
        return Timing(load_time_s=self.load_timer.total, train_time_s=train_time, epoch_times_s=state.epoch_times_s,
                      epochs_trained=epoch_fraction,
                      time_per_epoch_s=train_time / epoch_fraction if epoch_fraction else None,
                      optimizer_steps=state.step, tokens_trained=state.tokens,
                      tokens_per_s=state.tokens / train_time if train_time else None,
                      eval_time_s=self.eval_timer.total, processes=self.accelerator.num_processes)

    def memory(self) -> Memory:
        meter = self.meter
        return Memory(load=vars(meter.phases["load"]), train=vars(meter.phases["train"]),
                      train_per_process=self.per_process, headline_gb=meter.headline_gb("train"),
                      headline_kind="cuda_max_reserved" if self.device.type == "cuda" else "cpu_peak_rss_train",
                      estimate=self.estimate)


def run_training(cfg: RunConfig) -> RunRecord:
    """Train and evaluate one config; return the record written to the run folder's results.json."""
    return Run(cfg).execute()
