"""One fine-tuning run, top to bottom: config -> data -> model -> method -> train -> evaluate -> record.

Read :func:`run_training` from start to end to follow a run. The loop is ours (on accelerate for devices and
processes): AdamW, warmup + schedule, gradient accumulation with the loss normalised over every token of the
optimizer step, gradient clipping, a non-finite guard, and per-epoch timing that excludes evaluation.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab import model_card, tracking
from peftlab.baseline import evaluate_before
from peftlab.checkpoint import check_compatible, check_processes, load_checkpoint, resolve_resume
from peftlab.config import RunConfig
from peftlab.errors import ResourceError, TrainingDiverged, UserError
from peftlab.evals import BenchmarkStages
from peftlab.measure import MemoryMeter, PhasePeak, Stopwatch, folder_size_bytes, parameter_counts
from peftlab.methods import Method, get_method
from peftlab.models import LoadedModel, load_model, resolve_device, resolve_precision
from peftlab.per_example import write_stage
from peftlab.plan.memory import estimate_for_run
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

OOM_ADVICE = ("use a smaller --batch-size (raise --grad-accum to keep the global batch), turn on "
              "--gradient-checkpointing, or use --method qlora")


@dataclass
class LoopState:
    """Where the loop is: everything a checkpoint needs to continue exactly (with the RNG and optimizer states)."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens: int = 0
    epoch_elapsed_s: float = 0.0  # training time spent so far in the current, unfinished epoch
    epoch_times_s: list[float] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch_evals: list[dict[str, Any]] = field(default_factory=list)
    before: dict[str, Any] | None = None  # metrics of the model before training
    total_steps: int = 0
    steps_per_epoch: int = 0

    def train_seconds(self) -> float:
        return sum(self.epoch_times_s) + self.epoch_elapsed_s


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a function of (seed, epoch) only, so a resumed run sees the same order."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def step_micro_batches(perm: torch.Tensor, step_in_epoch: int, batch: int, accum: int, world: int,
                       rank: int) -> list[list[int]]:
    """This rank's micro-batches for one optimizer step.

    A step consumes ``batch * accum * world`` examples; micro-batch j of the step goes to rank ``j % world``, so
    1 process with accumulation 2 sees exactly what 2 processes with accumulation 1 see together.
    """
    per_step = batch * accum * world
    window = perm[step_in_epoch * per_step:(step_in_epoch + 1) * per_step].tolist()
    micro = [window[i:i + batch] for i in range(0, len(window), batch)]
    return micro[rank::world]


def steps_per_epoch(n: int, batch: int, accum: int, world: int) -> int:
    """Optimizer steps per epoch (a last partial step is kept on one process, dropped on several)."""
    per_step = batch * accum * world
    return math.ceil(n / per_step) if world == 1 else n // per_step


def build_optimizer(model: nn.Module, method: Method, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (or the method's own optimizer, e.g. LoRA+)."""
    own = method.make_optimizer(model, cfg)
    if own is not None:
        return own
    params = [p for p in model.parameters() if p.requires_grad]
    fused = cfg.fused_optimizer and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig, total_steps: int):
    """Linear warmup, then linear, cosine or constant."""
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def prepare_model(cfg: RunConfig, task: Task, method: Method,
                  model_kwargs: dict[str, Any] | None = None) -> tuple[LoadedModel, nn.Module]:
    """Load the base model for the task (``model_kwargs``: ``task.model_kwargs(raw)``) and wrap it with the method.

    The base model's newly initialised modules (a classification head) are trained and saved with the adapter.
    """
    method.check_supports(method.task_capability(task.model_kind))
    get_strategy(cfg.strategy).check(method, resolve_device(cfg.device))
    if resolve_precision(cfg, resolve_device(cfg.device)).name == "bf16-true":
        method.check_supports("bf16_true")
    loaded = load_model(cfg, task_kind=task.model_kind, quantize_4bit=method.quantizes_base,
                        trainable_base=not method.is_peft, **(model_kwargs or {}))
    torch.manual_seed(cfg.seed)  # adapter initialisation
    model = method.apply(loaded.model, cfg, task.model_kind, loaded.new_modules)
    if loaded.precision.name == "bf16-true":  # peft keeps adapters fp32 over a bf16 base; bf16-true means all bf16
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


def check_rss_cap(cfg: RunConfig) -> None:
    """On CPU, stop before the process exceeds the configured RSS cap."""
    from peftlab.measure import GB, current_rss_bytes

    if cfg.max_rss_gb is None:
        return
    rss = current_rss_bytes()
    if rss is not None and rss / GB > cfg.max_rss_gb:
        raise ResourceError(f"memory: the process uses {rss / GB:.2f} GB, over max_rss_gb={cfg.max_rss_gb}; "
                            + OOM_ADVICE)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", unit="step", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def optimizer_step(task: Task, model: nn.Module, micro: list[dict[str, torch.Tensor]], accelerator,
                   trainable: list[torch.Tensor], clip: float, device: torch.device,
                   precision: Precision, strategy: Strategy) -> tuple[float, float, int]:
    """Forward/backward over one step's micro-batches; returns (mean loss, grad norm, real tokens).

    The loss is normalised by the number of counted items (tokens or examples) in the whole step, over every
    process, so accumulation and data parallelism give the gradient of the global mean.
    """
    world = accelerator.num_processes
    counts = torch.tensor([sum(task.loss_count(b) for b in micro), sum(task.tokens_in(b) for b in micro)],
                          device=device, dtype=torch.float64)
    if world > 1:
        counts = accelerator.reduce(counts, reduction="sum")
    step_loss = torch.zeros((), device=device, dtype=torch.float64)
    for i, batch in enumerate(micro):
        with strategy.micro_batch(accelerator, model, last=i == len(micro) - 1):
            with compute_context(precision, device.type):  # the forward only: backward follows its dtypes
                loss_sum = task.loss(model, batch)
            accelerator.backward(loss_sum.float() * (world / counts[0]))
        step_loss += loss_sum.detach().double()
    if world > 1:
        step_loss = accelerator.reduce(step_loss, reduction="sum")
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip)
    if hasattr(grad_norm, "full_tensor"):  # sharded gradients (FSDP): the norm is a DTensor over all ranks
        grad_norm = grad_norm.full_tensor()
    return float(step_loss / counts[0]), float(grad_norm), int(counts[1])


def train_loop(cfg: RunConfig, task: Task, data: Any, model: nn.Module, method: Method, accelerator, run: RunDir,
               state: LoopState, device: torch.device, precision: Precision, eval_timer: Stopwatch,
               resume_from: Path | None = None, resume_state: dict[str, Any] | None = None) -> LoopState:
    """Run optimizer steps until the epochs (or max_steps) are done, checkpointing as configured."""
    world, rank = accelerator.num_processes, accelerator.process_index
    n = task.num_train_examples(data)
    per_epoch = steps_per_epoch(n, cfg.batch_size, cfg.grad_accum, world)
    if per_epoch == 0:
        raise UserError(f"train_subset/dataset: {n} training examples are fewer than one optimizer step "
                        f"({cfg.batch_size * cfg.grad_accum * world}); lower --batch-size or --grad-accum")
    total_steps = cfg.max_steps or per_epoch * cfg.epochs
    n_epochs = math.ceil(total_steps / per_epoch)
    state.total_steps, state.steps_per_epoch = total_steps, per_epoch
    strategy = get_strategy(cfg.strategy)
    model = strategy.shard(model, precision, device)  # before the optimizer: FSDP's optimizer holds the shards
    optimizer = build_optimizer(model, method, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    method.begin_training(model, total_steps)
    if resume_from is not None:
        check_processes(resume_from, resume_state, world)
        load_checkpoint(resume_from, model, optimizer, scheduler, resume_state)
    model, optimizer = strategy.prepare(accelerator, model, optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    clip = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
    model.train()
    bar = _progress(total_steps, accelerator.is_main_process)
    bar.update(state.step)
    timer = Stopwatch(device)

    def checkpoint(best: dict[str, Any] | None = None) -> None:
        strategy.save_checkpoint(accelerator, run.path, state, model, optimizer, scheduler, cfg, best)

    for epoch in range(state.epoch, n_epochs):
        perm = epoch_permutation(n, cfg.seed, epoch)
        for step_in_epoch in range(state.step_in_epoch, per_epoch):
            timer.start()
            micro = [task.train_batch(data, ix) for ix in step_micro_batches(
                perm, step_in_epoch, cfg.batch_size, cfg.grad_accum, world, rank)]
            mean_loss, grad_norm, tokens = optimizer_step(task, model, micro, accelerator, trainable, clip, device,
                                                       precision, strategy)
            state.step += 1
            if not math.isfinite(mean_loss):
                raise TrainingDiverged(state.step, "loss")
            if not math.isfinite(grad_norm):
                raise TrainingDiverged(state.step, "gradient norm")
            optimizer.step()
            method.after_optimizer_step(accelerator.unwrap_model(model), state.step)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.epoch_elapsed_s += timer.stop()
            state.tokens += tokens
            state.step_in_epoch = step_in_epoch + 1
            if state.step % cfg.logging_steps == 0 or state.step == total_steps:
                seconds = state.train_seconds()
                row = {"step": state.step, "epoch": epoch + state.step_in_epoch / per_epoch, "loss": mean_loss,
                       "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens": state.tokens,
                       "tokens_per_s": state.tokens / seconds if seconds > 0 else None, "train_time_s": seconds}
                state.history.append(row)
                run.log_metrics(row)
                tracking.log_step(accelerator, row)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{row['lr']:.2e}",
                                tok_s=f"{row['tokens_per_s'] or 0:.0f}")
            bar.update(1)
            check_rss_cap(cfg)
            if state.step >= total_steps:
                break
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step_in_epoch < per_epoch:
                checkpoint()
        state.epoch_times_s.append(state.epoch_elapsed_s)
        state.epoch, state.step_in_epoch, state.epoch_elapsed_s = epoch + 1, 0, 0.0
        if state.step >= total_steps:
            break
        # Epoch end (not the last): evaluate, then checkpoint with the metric for keep_best.
        eval_timer.start()
        with compute_context(precision, device.type):
            metrics = task.evaluate(data, accelerator.unwrap_model(model), f"epoch{epoch + 1}").metrics
        model.train()
        eval_timer.stop()
        state.epoch_evals.append({"epoch": epoch + 1, "step": state.step, **metrics})
        run.log_metrics({"step": state.step, "epoch": epoch + 1, "eval": metrics})
        tracking.log_eval(accelerator, metrics, state.step)
        checkpoint({"metric": task.metric, "value": metrics.get(task.metric),
                    "higher_is_better": task.higher_is_better} if cfg.keep_best else None)
    bar.close()
    return state


def save_trained(model: nn.Module, loaded: LoadedModel, method: Method, run: RunDir, accelerator,
                 strategy: Strategy, extra_files: dict[str, str] | None = None) -> Path:
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
        loaded.tokenizer.save_pretrained(target)
        for name, text in (extra_files or {}).items():
            (target / name).write_text(text, encoding="utf-8")
    accelerator.wait_for_everyone()
    return target


def run_training(cfg: RunConfig) -> dict[str, Any]:
    """Train and evaluate one config; return the results that were written to results.json."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    method = get_method(cfg.method)
    task = get_task(cfg.task)(cfg)
    raw = task.load()  # raw data: missing files, empty data and bad columns fail here, before the model loads

    # cpu=True whenever training runs on CPU (also for device "auto" without CUDA): under torchrun this is what
    # makes accelerate join the gloo process group (MULTI_CPU) instead of running each rank alone.
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise UserError("accelerate's FSDP plugin: peftlab applies FSDP2 itself; launch with a multi-process "
                        "accelerate config (examples/accelerate/fsdp2.yaml) and pass --strategy fsdp to peftlab "
                        "(docs/distributed.md)")
    accelerator = Accelerator(cpu=resolve_device(cfg.device).type == "cpu")
    if accelerator.distributed_type.name in ("DEEPSPEED", "MEGATRON_LM"):
        raise UserError(f"{accelerator.distributed_type.name} is not supported by peftlab's loop; launch with "
                        "torchrun or `accelerate launch --multi_gpu`, with --strategy ddp or fsdp "
                        "(docs/distributed.md)")
    resume = None
    if cfg.resume:  # checked before any heavy work: the checkpoint must exist and match this config
        if not cfg.output_dir:
            raise UserError("--resume needs --output-dir: the run directory that holds the checkpoints")
        run_path = RunDir.open_for(cfg, is_writer=False).path
        folder = resolve_resume(cfg.resume, run_path, cfg.allow_pickle)
        resume = (folder, check_compatible(folder, cfg))
    run = RunDir.open_for(cfg, is_writer=accelerator.is_main_process, resuming=resume is not None)
    if resume is not None:
        run.truncate_metrics(after_step=resume[1]["loop"]["step"])
    started = dt.datetime.now(dt.UTC)
    set_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        tracking.start(accelerator, cfg, run.path)  # --report-to: a missing package fails here, before the model
        return _train_and_record(cfg, task, raw, method, accelerator, run, started, resume)
    except TrainingDiverged as exc:
        run.fail(str(exc), {"step": exc.step})
        raise UserError(f"training stopped: {exc}; lower --lr, check the data, or keep --max-grad-norm on. "
                        f"The run is marked failed in {run.path}") from None
    except torch.OutOfMemoryError:
        run.fail("out of memory")
        raise ResourceError(f"out of memory while training; {OOM_ADVICE}") from None
    except UserError as exc:
        run.fail(str(exc))
        raise
    except BaseException as exc:
        run.fail(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        tracking.finish(accelerator)


def _train_and_record(cfg: RunConfig, task: Task, raw: Any, method: Method, accelerator, run: RunDir,
                      started: dt.datetime, resume: tuple[Path, dict[str, Any]] | None) -> dict[str, Any]:
    from peftlab.models import resolve_device

    meter = MemoryMeter(resolve_device(cfg.device))
    load_timer = Stopwatch()
    load_timer.start()
    benchmarks = BenchmarkStages.for_config(cfg)  # bad benchmark names or files fail here, before the model
    meter.start("load")
    loaded, model = prepare_model(cfg, task, method, task.model_kwargs(raw))
    if accelerator.is_main_process:
        method.before_training_save(model, run.path)  # PiSSA: its initial adapter, to save a plain LoRA at the end
    data = task.prepare(raw, loaded.tokenizer, model)
    meter.stop()
    load_timer.stop()
    device = loaded.device
    params = parameter_counts(model)
    if accelerator.is_main_process:
        print(f"trainable params: {params['trainable_params']:,} of {params['total_params']:,} "
              f"({params['trainable_percent']:.4f}%)", file=sys.stderr)

    eval_timer = Stopwatch(device)
    state, resumed_from = LoopState(), None
    before: Evaluation | None = None  # its per-example outputs go into the artifacts (not kept across a resume)
    if resume is not None:
        resumed_from, saved_state = resume
        state = LoopState(**saved_state["loop"])
    elif cfg.eval_before:  # shared by runs with the same baseline key (peftlab.baseline)
        eval_timer.start()
        with compute_context(loaded.precision, device.type):
            before = evaluate_before(cfg, task, data, model, loaded, method, run)
        state.before = before.metrics
        eval_timer.stop()
        tracking.log_eval(accelerator, state.before, 0, "eval_before")
    if resume is not None:  # the base's scores were written before the interruption
        benchmarks.restore("before", run.path)
    elif cfg.eval_before:
        benchmarks.score("before", model, loaded, run.path, write=run.is_writer)

    meter.start("train")
    state = train_loop(cfg, task, data, model, method, accelerator, run, state, device, loaded.precision, eval_timer,
                       resumed_from, resume[1] if resume else None)
    per_process = train_peaks_per_process(meter.stop(), accelerator, device)

    eval_timer.start()
    with compute_context(loaded.precision, device.type):
        final = task.evaluate(data, accelerator.unwrap_model(model), "after")
    after = final.metrics
    eval_timer.stop()
    benchmarks.score("after", accelerator.unwrap_model(model), loaded, run.path, write=run.is_writer)  # own timer
    with compute_context(loaded.precision, device.type):
        sample = task.sample(data, accelerator.unwrap_model(model), final)
    saved = save_trained(model, loaded, method, run, accelerator, get_strategy(cfg.strategy))
    if run.is_writer:  # only rank 0 writes files
        task.write_artifacts(data, run.path, final, before)
        write_stage(run.path, task.name, final)  # per-example values, for intervals

    train_time = state.train_seconds()
    epoch_fraction = state.step / state.steps_per_epoch
    fields = cfg.method_fields()
    record = RunRecord(
        schema_version=RESULTS_SCHEMA,
        status="done",
        run_dir=str(run.path),
        started=started.isoformat(),
        finished=dt.datetime.now(dt.UTC).isoformat(),
        config=cfg.model_dump(mode="json"),
        model=ModelInfo(name=cfg.model, source=loaded.source, architecture=type(loaded.model).__name__,
                        dtype=str(loaded.dtype).removeprefix("torch."), device=str(device),
                        precision=loaded.precision.name, precision_reason=loaded.precision.reason),
        method=MethodInfo(name=method.name, summary=method.summary, fields=fields, r=fields.get("r"),
                          alpha=fields.get("alpha"), target_modules=_adapter_targets(model)),
        task=TaskInfo(name=task.name, metric=task.metric, higher_is_better=task.higher_is_better),
        data=task.info(data),
        params=params,
        metrics=Metrics(before=state.before, after=after, per_epoch=state.epoch_evals,
                        final_train_loss=state.history[-1]["loss"] if state.history else None),
        timing=Timing(
            load_time_s=load_timer.total,
            train_time_s=train_time,
            epoch_times_s=state.epoch_times_s,
            epochs_trained=epoch_fraction,
            time_per_epoch_s=train_time / epoch_fraction if epoch_fraction else None,
            optimizer_steps=state.step,
            tokens_trained=state.tokens,
            tokens_per_s=state.tokens / train_time if train_time else None,
            eval_time_s=eval_timer.total,
            processes=accelerator.num_processes,
        ),
        memory=Memory(
            load=vars(meter.phases["load"]),
            train=vars(meter.phases["train"]),
            train_per_process=per_process,
            headline_gb=meter.headline_gb("train"),
            headline_kind="cuda_max_reserved" if device.type == "cuda" else "cpu_peak_rss_train",
            estimate=estimate_for_run(cfg, accelerator.unwrap_model(model)),
        ),
        artifact=Artifact(path=str(saved), kind="adapter" if method.is_peft else "model",
                          size_bytes=folder_size_bytes(saved) if saved.exists() else None),
        sample=sample,
        seed=cfg.seed,
        versions=package_versions(),
        git_commit=git_commit(),
        machine=machine_info(),
        resumed=resumed_from is not None,
        resumed_from=str(resumed_from) if resumed_from else None,
        **benchmarks.record(),
    )
    run.finish(record)
    results = record.to_dict()
    if accelerator.is_main_process:
        model_card.write_card(saved, results)  # replaces peft's placeholder README.md
        print(format_result_row(record))
    tracking.log_results(accelerator, results)
    return results


def train_peaks_per_process(peak: PhasePeak, accelerator, device: torch.device) -> list[dict[str, float | None]]:
    """Every process's training peaks (rank order), gathered on all ranks; rank 0's alone on one process."""
    keys = ("cpu_peak_rss_gb", "cuda_max_allocated_gb", "cuda_max_reserved_gb")
    mine = [getattr(peak, k) for k in keys]
    if accelerator.num_processes == 1:
        return [dict(zip(keys, mine, strict=True))]
    values = torch.tensor([[float("nan") if v is None else v for v in mine]], dtype=torch.float64, device=device)
    gathered = accelerator.gather(values).cpu().tolist()
    return [{k: (None if v != v else v) for k, v in zip(keys, row, strict=True)} for row in gathered]


def _adapter_targets(model: nn.Module) -> list[str] | None:
    """The modules the adapter was actually applied to (from peft's config), if any."""
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        return None
    targets = getattr(next(iter(peft_config.values())), "target_modules", None)  # prefix tuning has none
    return sorted(targets) if targets else None
