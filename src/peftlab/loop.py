"""The optimizer loop of one run: the data order, one optimizer step, and the epochs with their evaluations and
checkpoints.

The loop is ours (on accelerate for devices and processes): AdamW, warmup + schedule, gradient accumulation with the
loss normalised over every token of the optimizer step, gradient clipping, a non-finite guard, and per-epoch timing
that excludes evaluation. :class:`TrainLoop` reads what it needs from its run (:class:`LoopHost`, which
:class:`peftlab.train.Run` is) and keeps the rest to itself.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from peftlab import tracking
from peftlab.checkpoint import check_processes, load_checkpoint
from peftlab.config import RunConfig
from peftlab.errors import ResourceError, TrainingDiverged, UserError
from peftlab.measure import Stopwatch
from peftlab.methods import Method
from peftlab.precision import Precision, compute_context
from peftlab.record import RunDir
from peftlab.strategies import Strategy
from peftlab.tasks import Task

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


class Resume(NamedTuple):
    """A checkpoint to continue from: its folder and its saved state (checked against the config)."""

    folder: Path
    saved: dict[str, Any]


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


class LoopHost(Protocol):
    """What the loop reads from its run, each decided once when the run is built (:class:`peftlab.train.Run`)."""

    cfg: RunConfig
    task: Task
    method: Method
    strategy: Strategy
    accelerator: Any
    run_dir: RunDir
    device: torch.device
    precision: Precision
    eval_timer: Stopwatch


class TrainLoop:
    """Optimizer steps until the epochs (or max_steps) are done, evaluating at each epoch end but the last and
    checkpointing as configured. Build it, :meth:`prepare` the model, then :meth:`run`."""

    def __init__(self, host: LoopHost, data: Any, state: LoopState) -> None:
        self.host, self.data, self.state = host, data, state
        self.cfg, self.task, self.accelerator, self.device = host.cfg, host.task, host.accelerator, host.device
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.n = self.task.num_train_examples(data)
        cfg = self.cfg
        self.per_epoch = steps_per_epoch(self.n, cfg.batch_size, cfg.grad_accum, self.world)
        if self.per_epoch == 0:
            raise UserError(f"train_subset/dataset: {self.n} training examples are fewer than one optimizer step "
                            f"({cfg.batch_size * cfg.grad_accum * self.world}); lower --batch-size or --grad-accum")
        self.total_steps = cfg.max_steps or self.per_epoch * cfg.epochs
        self.n_epochs = math.ceil(self.total_steps / self.per_epoch)
        state.total_steps, state.steps_per_epoch = self.total_steps, self.per_epoch
        self.timer = Stopwatch(self.device)

    def prepare(self, model: nn.Module, resume: Resume | None) -> None:
        """Shard the model, build the optimizer and schedule, restore a checkpoint, wrap for the processes."""
        strategy, method = self.host.strategy, self.host.method
        # sharded before the optimizer is built: FSDP's optimizer holds the shards
        model = strategy.shard(model, self.host.precision, self.device)
        optimizer = build_optimizer(model, method, self.cfg)
        self.scheduler = build_scheduler(optimizer, self.cfg, self.total_steps)
        method.begin_training(model, self.total_steps)
        if resume is not None:
            check_processes(resume.folder, resume.saved, self.world)
            load_checkpoint(resume.folder, model, optimizer, self.scheduler, resume.saved)
        self.model, self.optimizer = strategy.prepare(self.accelerator, model, optimizer)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.clip = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else float("inf")

    def run(self) -> LoopState:
        """Train every remaining epoch; return the final state."""
        state = self.state
        self.model.train()
        self.bar = _progress(self.total_steps, self.accelerator.is_main_process)
        self.bar.update(state.step)
        for epoch in range(state.epoch, self.n_epochs):
            self.train_epoch(epoch)
            state.epoch_times_s.append(state.epoch_elapsed_s)
            state.epoch, state.step_in_epoch, state.epoch_elapsed_s = epoch + 1, 0, 0.0
            if state.step >= self.total_steps:
                break
            self.end_epoch(epoch)
        self.bar.close()
        return state

    def train_epoch(self, epoch: int) -> None:
        """The optimizer steps of one epoch (from where a resumed run stopped), up to the last step."""
        state, cfg = self.state, self.cfg
        perm = epoch_permutation(self.n, cfg.seed, epoch)
        for step_in_epoch in range(state.step_in_epoch, self.per_epoch):
            self.timer.start()
            micro = [self.task.train_batch(self.data, ix) for ix in step_micro_batches(
                perm, step_in_epoch, cfg.batch_size, cfg.grad_accum, self.world, self.rank)]
            mean_loss, grad_norm, tokens = self.optimizer_step(micro)
            state.step += 1
            self.update(mean_loss, grad_norm)
            state.epoch_elapsed_s += self.timer.stop()
            state.tokens += tokens
            state.step_in_epoch = step_in_epoch + 1
            if state.step % cfg.logging_steps == 0 or state.step == self.total_steps:
                self.log_step(epoch, mean_loss, grad_norm)
            self.bar.update(1)
            check_rss_cap(cfg)
            if state.step >= self.total_steps:
                return
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step_in_epoch < self.per_epoch:
                self.checkpoint()

    def optimizer_step(self, micro: list[dict[str, torch.Tensor]]) -> tuple[float, float, int]:
        """Forward/backward over one step's micro-batches; returns (mean loss, grad norm, real tokens).

        The loss is normalised by the number of counted items (tokens or examples) in the whole step, over every
        process, so accumulation and data parallelism give the gradient of the global mean.
        """
        task, model, accelerator, device = self.task, self.model, self.accelerator, self.device
        precision, strategy = self.host.precision, self.host.strategy
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
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.clip)
        if hasattr(grad_norm, "full_tensor"):  # sharded gradients (FSDP): the norm is a DTensor over all ranks
            grad_norm = grad_norm.full_tensor()
        return float(step_loss / counts[0]), float(grad_norm), int(counts[1])

    def update(self, mean_loss: float, grad_norm: float) -> None:
        """Refuse a non-finite step, else apply it: optimizer, the method's hook, schedule, cleared gradients."""
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(self.state.step, "loss")
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(self.state.step, "gradient norm")
        self.optimizer.step()
        self.host.method.after_optimizer_step(self.accelerator.unwrap_model(self.model), self.state.step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def log_step(self, epoch: int, mean_loss: float, grad_norm: float) -> None:
        """One row of metrics.jsonl, the trackers and the progress bar."""
        state = self.state
        seconds = state.train_seconds()
        row = {"step": state.step, "epoch": epoch + state.step_in_epoch / self.per_epoch, "loss": mean_loss,
               "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens": state.tokens,
               "tokens_per_s": state.tokens / seconds if seconds > 0 else None, "train_time_s": seconds}
        state.history.append(row)
        self.host.run_dir.log_metrics(row)
        tracking.log_step(self.accelerator, row)
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s'] or 0:.0f}")

    def end_epoch(self, epoch: int) -> None:
        """An epoch's end (not the last): evaluate, then checkpoint with the metric for keep_best."""
        host, task, state = self.host, self.task, self.state
        host.eval_timer.start()
        with compute_context(host.precision, self.device.type):
            metrics = task.evaluate(self.data, self.accelerator.unwrap_model(self.model), f"epoch{epoch + 1}").metrics
        self.model.train()
        host.eval_timer.stop()
        state.epoch_evals.append({"epoch": epoch + 1, "step": state.step, **metrics})
        host.run_dir.log_metrics({"step": state.step, "epoch": epoch + 1, "eval": metrics})
        tracking.log_eval(self.accelerator, metrics, state.step)
        self.checkpoint({"metric": task.metric, "value": metrics.get(task.metric),
                         "higher_is_better": task.higher_is_better} if self.cfg.keep_best else None)

    def checkpoint(self, best: dict[str, Any] | None = None) -> None:
        self.host.strategy.save_checkpoint(self.accelerator, self.host.run_dir.path, self.state, self.model,
                                           self.optimizer, self.scheduler, self.cfg, best)
