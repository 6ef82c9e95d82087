"""The `peftlab` command: parses arguments and calls a workflow. User errors become one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from peftlab.errors import UserError

# CLI flags for common config fields: (flag, field, type). Their help and defaults come from the config's fields
# (RunConfig, or the method fields models); any other field: --set field=value.
COMMON_FIELDS: list[tuple[str, str, Callable[[str], Any]]] = [
    ("--model", "model", str),
    ("--task", "task", str),
    ("--dataset", "dataset", str),
    ("--eval-dataset", "eval_dataset", str),
    ("--data-dir", "data_dir", str),
    ("--text-column", "text_column", str),
    ("--text-pair-column", "text_pair_column", str),
    ("--label-column", "label_column", str),
    ("--method", "method", str),
    ("--r", "r", int),
    ("--alpha", "alpha", float),
    ("--dropout", "dropout", float),
    ("--target-modules", "target_modules", str),
    ("--lr", "lr", float),
    ("--epochs", "epochs", int),
    ("--max-steps", "max_steps", int),
    ("--block-size", "block_size", int),
    ("--max-length", "max_length", int),
    ("--batch-size", "batch_size", int),
    ("--grad-accum", "grad_accum", int),
    ("--output-dir", "output_dir", str),
    ("--seed", "seed", int),
    ("--train-subset", "train_subset", int),
    ("--eval-subset", "eval_subset", int),
    ("--device", "device", str),
    ("--precision", "precision", str),
    ("--strategy", "strategy", str),
    ("--dtype", "dtype", str),
    ("--save-every", "save_every", int),
    ("--max-grad-norm", "max_grad_norm", float),
    ("--report-to", "report_to", str),
    ("--benchmarks", "benchmarks", str),
    ("--benchmark-limit", "benchmark_limit", int),
]
#: Flags kept for old commands: an alias of a field (configure.py maps them).
ALIAS_HELP = {"dtype": "old name of --precision: float32 = fp32, bfloat16 = bf16-true, auto = auto"}
FLAGS = [("--overwrite", "overwrite"), ("--trust-remote-code", "trust_remote_code"), ("--allow-pickle", "allow_pickle"),
         ("--gradient-checkpointing", "gradient_checkpointing")]


def field_help(name: str) -> str:
    """A config field's help: its description and default, from RunConfig or the first method that takes it."""
    from peftlab.config import RunConfig
    from peftlab.methods import METHODS, method_names

    if name in ALIAS_HELP:
        return ALIAS_HELP[name]
    info = RunConfig.model_fields.get(name)
    owners = ""
    if info is None:
        takers = [m for m in method_names() if name in METHODS[m].field_names()]
        info = METHODS[takers[0]].fields.model_fields[name]
        owners = f"; methods {', '.join(takers)}"
    text = (info.description or name).rstrip(".")
    if name == "method":
        text += f": {' | '.join(method_names())}"
    if name == "task":
        text += ": {tasks}"
    default = info.get_default(call_default_factory=True)
    if isinstance(default, list):
        default = ",".join(map(str, default))
    shown = f" (default {default}{owners})" if default is not None and not isinstance(default, bool) else \
        (f" ({owners.removeprefix('; ')})" if owners else "")
    help_text = (text + shown).replace("%", "%%")
    return TaskHelp(help_text) if name == "task" else help_text


class TaskHelp(str):
    """The --task help. argparse expands a help string (``help % params``) only when it shows it, and only then are
    the registered tasks listed: importing them imports torch, which parsing the arguments does not need."""

    def __mod__(self, params: Any) -> str:
        from peftlab.tasks import task_names

        return str.__mod__(self.replace("{tasks}", " | ".join(task_names())), params)


def _add_config_args(parser: argparse.ArgumentParser, fields: Sequence[str] | None = None) -> None:
    for flag, dest, kind in COMMON_FIELDS:
        if fields is None or dest in fields:
            parser.add_argument(flag, dest=dest, type=kind, default=None, help=field_help(dest))
    for flag, dest in FLAGS:
        if fields is None or dest in fields:
            parser.add_argument(flag, dest=dest, action="store_true", default=None, help=field_help(dest))
    parser.add_argument("--set", dest="set_fields", action="append", default=[], metavar="FIELD=VALUE",
                        help="set any config field (value parsed as YAML), e.g. --set warmup_ratio=0.1")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    fields = {dest for _, dest, _ in COMMON_FIELDS} | {dest for _, dest in FLAGS}
    out = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    for item in args.set_fields:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set warmup_ratio=0.1")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: the value is not valid YAML") from None
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from peftlab.configure import load_config
    from peftlab.train import run_training

    overrides = _overrides(args)
    if args.resume is not None:
        overrides["resume"] = args.resume
    cfg = load_config(args.config, overrides)
    if args.processes is not None and args.processes != 1:
        from peftlab.launch import check_launch, launch_train
        from peftlab.models import resolve_device
        from peftlab.tasks import get_task

        check_launch(args.processes)
        get_task(cfg.task)(cfg).load()  # missing files, empty data, bad columns: one line here, not one per rank
        return launch_train(args.argv, args.processes, resolve_device(cfg.device).type)
    run_training(cfg)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from peftlab.evaluate import run_eval

    overrides = _overrides(args)
    if args.split:
        overrides["eval_split"] = args.split
    result = run_eval(overrides, args.adapter, args.base_precision)
    print(json.dumps(result if args.json else result["metrics"], indent=2, default=str))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from peftlab.evaluate import run_generate

    print(run_generate(_overrides(args), args.adapter, args.prompt, args.max_new_tokens, args.chat,
                       args.base_precision))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning, measured.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune a model and record the run")
    train.add_argument("--config", help="YAML config; flags override its fields")
    train.add_argument("--processes", type=int, default=None, metavar="N",
                       help="data-parallel processes on this machine, launched through torchrun (default 1); "
                            "the global batch is batch_size x grad_accum x N")
    train.add_argument("--resume", nargs="?", const="auto", default=None,
                       help="continue from the newest valid checkpoint in --output-dir, or from PATH")
    _add_config_args(train)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="evaluate a base model or base + adapter")
    evaluate.add_argument("--adapter", help="a run's adapter/ folder (its run config supplies the defaults)")
    evaluate.add_argument("--split", help="split of a named dataset (e.g. validation, test)")
    evaluate.add_argument("--base-precision", choices=["auto", "4bit", "full"], default="auto",
                          help="load the base in 4-bit (default: as the adapter was trained)")
    evaluate.add_argument("--json", action="store_true", help="print data provenance too")
    _add_config_args(evaluate, ["model", "task", "dataset", "eval_dataset", "data_dir", "text_column",
                                "text_pair_column", "label_column", "block_size", "max_length", "eval_subset",
                                "batch_size", "device", "precision", "dtype", "trust_remote_code", "allow_pickle",
                                "benchmarks", "benchmark_limit"])
    evaluate.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="print a completion for a prompt")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--adapter", help="a run's adapter/ folder")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--base-precision", choices=["auto", "4bit", "full"], default="auto")
    _add_config_args(gen, ["model", "device", "precision", "dtype", "trust_remote_code", "allow_pickle"])
    gen.set_defaults(func=cmd_generate)

    _add_study_commands(sub)
    _add_memory_commands(sub)
    return parser


def cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from peftlab import sweep
    from peftlab.sweep.executor import build_executor

    out = args.output_dir or str(Path("sweeps") / Path(args.sweep_file).stem)
    if args.calibrate:
        from peftlab.sweep.calibrate import cli_calibrate

        return cli_calibrate(args.sweep_file, out)
    spec = sweep.load_sweep(args.sweep_file)  # a bad sweep file fails before any executor starts
    executor = build_executor(args.executor, _executor_options(args), spec.slurm)
    if args.dry_run:
        try:
            print(sweep.format_preview(sweep.preview_sweep(args.sweep_file, out, args.retry_failed, executor.slots)))
        finally:
            executor.close()
        return 0
    outcome = sweep.run_sweep(args.sweep_file, out, args.retry_failed, on_progress=sweep.ProgressBar(),
                              executor=executor)
    for run_id, error in outcome.failed.items():
        print(f"failed: {run_id}: {error} (log: {Path(out) / 'logs' / (run_id + '.log')})", file=sys.stderr)
    if outcome.failed:
        print(f"peftlab: {len(outcome.failed)} run(s) failed; fix the cause and rerun with --retry-failed",
              file=sys.stderr)
    return 1 if outcome.failed else 0


def _executor_options(args: argparse.Namespace):
    from peftlab.sweep.executor import ExecutorOptions

    slurm = {"partition": args.slurm_partition, "time": args.slurm_time, "gpus_per_task": args.slurm_gpus_per_task,
             "cpus_per_task": args.slurm_cpus_per_task, "array_parallelism": args.slurm_array_parallelism,
             "cluster": args.slurm_cluster}
    return ExecutorOptions(parallel=args.parallel, gpus_per_run=args.gpus_per_run, cpus_per_run=args.cpus_per_run,
                           ray_address=args.ray_address, slurm=slurm)


def cmd_report(args: argparse.Namespace) -> int:
    from peftlab.report import write_report

    made = write_report(args.sweep_dir, args.output_dir, args.readme, args.mixed_machines, args.seed_table)
    if made.seed_table is not None:
        print(made.seed_table.read_text(encoding="utf-8"))
    print("\n".join(f"{what}: {path}" for what, path in made.summary_lines()))
    return 0


def _add_executor_arguments(sweep: argparse.ArgumentParser) -> None:
    """Where the sweep's runs start (docs/distributed.md: Sweeps on many GPUs and nodes)."""
    group = sweep.add_argument_group("executor", "where each run's process starts (ray and slurm: "
                                     "pip install 'peftlab[cluster]')")
    group.add_argument("--executor", default="local", metavar="{local,ray,slurm}",
                       help="local: slots on this machine (default); ray: one Ray task per run; slurm: one "
                            "submitit job-array task per run")
    group.add_argument("--parallel", type=int, metavar="N",
                       help="runs at once (local default: one per visible GPU, 1 on CPU; ray: as many as fit)")
    group.add_argument("--gpus-per-run", type=int, metavar="K", help="GPUs each run gets (default 1 with GPUs)")
    group.add_argument("--cpus-per-run", type=int, metavar="C",
                       help="ray: CPUs each run's task takes (its torch threads)")
    group.add_argument("--ray-address", metavar="auto|HOST:PORT",
                       help="ray: join this cluster (default: start a local Ray instance)")
    group.add_argument("--slurm-partition", help="slurm: the partition")
    group.add_argument("--slurm-time", type=int, metavar="MINUTES", help="slurm: time limit per run")
    group.add_argument("--slurm-gpus-per-task", type=int, metavar="K", help="slurm: GPUs per run")
    group.add_argument("--slurm-cpus-per-task", type=int, metavar="C", help="slurm: CPUs per run")
    group.add_argument("--slurm-array-parallelism", type=int, metavar="N", help="slurm: runs at once (default 256)")
    group.add_argument("--slurm-cluster", choices=("slurm", "local"),
                       help="slurm: 'local' runs the same job code with submitit's local executor (no SLURM)")


def _add_study_commands(sub: Any) -> None:
    sweep = sub.add_parser("sweep", help="run a grid of configs, each in its own process, recorded in a store")
    sweep.add_argument("sweep_file", metavar="SWEEP.yaml", help="sweep file: base: config fields, grid: axes")
    sweep.add_argument("--output-dir", help="store, runs and logs (default: sweeps/<sweep file name>)")
    sweep.add_argument("--retry-failed", action="store_true", help="also redo runs that failed before")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and a time estimate; run nothing")
    sweep.add_argument("--calibrate", action="store_true", help="time one short run per row on this machine and "
                       "write OUTPUT_DIR/calibration.json, which --dry-run and the ETA then use")
    _add_executor_arguments(sweep)
    sweep.set_defaults(func=cmd_sweep)
    report = sub.add_parser("report", help="tables, plots and an HTML report from a sweep's store")
    report.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the --output-dir of `peftlab sweep`")
    report.add_argument("--output-dir", help="where to write the report (default: SWEEP_DIR/report)")
    report.add_argument("--readme", metavar="README.md",
                        help="also write the tables and findings into this file, between its "
                             "'<!-- study:start -->' and '<!-- study:end -->' lines")
    report.add_argument("--mixed-machines", action="store_true",
                        help="show time and speed cells of tables whose runs were measured on several machines "
                             "(blank by default: they compare only within one machine)")
    report.add_argument("--seed-table", action="store_true",
                        help="also print and write seed_table.md: the seed's layout (Model | Training Type | (r, α) "
                             "| Time/Epoch | metric | Memory) from the measured rows, each cell with its interval, "
                             "beside the seed's own claims")
    report.set_defaults(func=cmd_report)



def cmd_plan(args: argparse.Namespace) -> int:
    from peftlab.configure import load_config
    from peftlab.plan import memory as planner
    from peftlab.plan.seed_table import format_seed_table, seed_table

    processes = 1 if args.processes is None else args.processes
    if processes < 1:
        raise UserError(f"--processes {processes}: give 1 or more processes")
    if args.seed_table:
        rows = seed_table(device=args.device if args.device in ("cpu", "cuda") else "cuda",
                          precision=args.precision if args.precision not in (None, "auto") else "bf16-mixed",
                          batch_size=args.batch_size or 4, seq_len=args.block_size or 128,
                          grad_accum=args.grad_accum or 8, fsdp_processes=processes if processes > 1 else 8)
        print(json.dumps([dict(r, plan=r["plan"].as_dict()) for r in rows], indent=2) if args.json
              else format_seed_table(rows))
        return 0
    overrides = _overrides(args)
    cfg = load_config(args.config, overrides)
    auto_gpu = cfg.device == "auto" and cfg.strategy == "fsdp" and processes > 1
    if auto_gpu:
        cfg = load_config(args.config, dict(overrides, device="cuda"))  # FSDP shards over GPUs: plan one GPU
    runtime = planner.runtime_bytes_option(args.runtime_gb, args.measure_runtime)
    try:
        result = planner.plan_for_config(cfg, optimizer=args.optimizer, runtime_bytes=runtime, processes=processes)
    except planner.NotPlanned as reason:  # a method the planner does not model: a note, not an error
        print(f"note: {reason}")
        return 0
    if result.inputs.device == "cuda" and not planner.cuda_here():
        result.notes.append("no CUDA device here: planned for a bf16-capable GPU (A100, H100)"
                            + (f"; --device auto with fsdp: one GPU of {processes}" if auto_gpu else ""))
    print(json.dumps(result.as_dict(), indent=2) if args.json else planner.format_plan(result))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from peftlab.merge import format_report, run_merge

    report = run_merge(args.adapter, args.output_dir, _overrides(args), overwrite=args.overwrite)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from peftlab.export import format_report, run_export

    report = run_export(args.adapter, args.output, args.export_format, args.outtype, _overrides(args),
                        overwrite=args.overwrite)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _add_memory_commands(sub: Any) -> None:
    plan = sub.add_parser("plan", help="predict peak memory per component without loading weights")
    plan.add_argument("--config", help="YAML config to plan; flags override its fields")
    plan.add_argument("--seed-table", action="store_true",
                      help="predict every row of the seed's tables (7B models) next to the seed's claims")
    plan.add_argument("--optimizer", choices=["adamw", "adamw8bit", "sgd"], default="adamw")
    plan.add_argument("--runtime-gb", type=float, help="runtime term (default: calibrated constant)")
    plan.add_argument("--measure-runtime", action="store_true",
                      help="CPU: measure this machine's bare `import torch, transformers, peft` RSS for the runtime")
    plan.add_argument("--processes", type=int, default=None, metavar="N",
                      help="plan one process of a run on N processes (default 1); with --strategy fsdp and "
                           "--device auto, N GPUs")
    plan.add_argument("--json", action="store_true", help="print JSON")
    _add_config_args(plan, ["model", "task", "method", "r", "alpha", "dropout", "target_modules", "block_size",
                            "max_length", "batch_size", "grad_accum", "device", "precision", "dtype",
                            "gradient_checkpointing", "strategy"])
    plan.set_defaults(func=cmd_plan)
    merge = sub.add_parser("merge", help="fold a LoRA/IA3 adapter into its base and save a plain HF model")
    merge.add_argument("--adapter", required=True, help="a run's adapter/ folder")
    merge.add_argument("--output-dir", required=True, help="where to save the merged model")
    merge.add_argument("--overwrite", action="store_true", help="replace a model already in --output-dir")
    merge.add_argument("--json", action="store_true", help="print the comparison as JSON")
    _add_config_args(merge, ["model", "device", "precision", "dtype", "trust_remote_code", "allow_pickle"])
    merge.set_defaults(func=cmd_merge)
    export = sub.add_parser("export", help="merge an adapter and write a GGUF file (llama.cpp, Ollama) or a "
                                           "merged safetensors folder")
    export.add_argument("--adapter", required=True, help="a run's adapter/ folder")
    export.add_argument("--format", dest="export_format", default="gguf", metavar="gguf|safetensors",
                        help="gguf: one file for llama.cpp/Ollama (Llama, Mistral); safetensors: a merged HF "
                             "folder, as `peftlab merge` (default gguf)")
    export.add_argument("--outtype", default=None, metavar="f16|bf16|q8_0",
                        help="GGUF weight type of the matrices; norms stay f32 (default f16)")
    export.add_argument("--output", required=True, help="the .gguf file (gguf) or the folder (safetensors)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    export.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_config_args(export, ["model", "device", "precision", "dtype", "trust_remote_code", "allow_pickle"])
    export.set_defaults(func=cmd_export)



def _quiet_libraries() -> None:
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes warns on every import that an optional hub-downloaded CPU kernel is missing; it falls back to
    # its built-in kernels. transformers' deprecation notices are for library authors, not for users.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run a subcommand; a UserError prints one line and returns 2."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        _quiet_libraries()
        return args.func(args)
    except UserError as exc:
        print(f"peftlab: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("peftlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
