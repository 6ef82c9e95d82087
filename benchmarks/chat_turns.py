"""Multi-turn chat: learning every assistant turn (chat_loss=all) against only the last (chat_loss=last).

A multi-turn set is built from alpaca-libre by chaining 2 or 3 consecutive examples into one conversation (user:
instruction and input, assistant: output; the number of exchanges drawn with a fixed seed): training
conversations from its train split, evaluation conversations from its test split. Both runs train the same LoRA on
the same conversations in the same order, for one epoch with the same batch size and accumulation, so they see the
same tokens and take the same number of optimizer steps; only the tokens that carry loss differ (every assistant
turn, or the last). After training, each adapter (and the base model) is scored on the evaluation conversations:
response perplexity of every assistant turn, by turn position (1st, 2nd, 3rd answer) and over all of them.

    python benchmarks/chat_turns.py --out runs/bench/chat-turns --results docs/results/chat-turns

Writes the generated data and the two runs under OUT (never into the repository), and RESULTS/results.json and
RESULTS/results.md. Not a timing benchmark: the figures are losses and perplexities.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import shlex
import subprocess
import sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODES = ("all", "last")


def alpaca_rows(path: Path) -> list[dict[str, str]]:
    """The split's records with a non-blank output, in file order."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if str(r.get("output") or "").strip()]


def chain(rows: list[dict[str, str]], conversations: int, seed: int) -> list[dict[str, Any]]:
    """Consecutive records chained into conversations of 2 or 3 exchanges (the count drawn with ``seed``)."""
    rng = random.Random(seed)
    out, i = [], 0
    while len(out) < conversations:
        n = rng.choice((2, 3))
        if i + n > len(rows):
            raise SystemExit(f"only {len(out)} conversations fit in {len(rows)} records; ask for fewer")
        messages = []
        for row in rows[i:i + n]:
            user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
        out.append({"messages": messages})
        i += n
    return out


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def train_both(args, train_file: Path, eval_file: Path) -> dict[str, Path]:
    """Both `peftlab train` processes, side by side (one thread each: on a busy shared CPU two single-threaded
    processes get through more work than one two-threaded one); returns their run folders.

    The runs' own evaluation is cut to one conversation: the comparison is the turn-by-turn scoring below."""
    runs, procs = {}, {}
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for mode in MODES:
        runs[mode] = args.out / "runs" / f"chat-loss-{mode}"
        cmd = [sys.executable, "-m", "peftlab", "train", "--task", "instruction", "--model", args.model,
               "--method", "lora", "--dataset", str(train_file), "--eval-dataset", str(eval_file),
               "--output-dir", str(runs[mode]), "--epochs", "1", "--batch-size", str(args.batch_size),
               "--grad-accum", str(args.grad_accum), "--lr", str(args.lr), "--max-length", str(args.max_length),
               "--seed", "0", "--eval-subset", "1", "--set", f"chat_loss={mode}", "--set", "precision=fp32",
               "--set", "threads=1", "--set", "generation_subset=1", "--set", "max_new_tokens=8",
               "--set", "eval_before=false", "--set", "overwrite=true"]
        log = args.out / "logs" / f"chat-loss-{mode}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w", encoding="utf-8") as fh:
            fh.write("$ " + shlex.join(cmd) + "\n")
            fh.flush()
            procs[mode] = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    for mode, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"chat_loss={mode} failed; see {args.out / 'logs' / f'chat-loss-{mode}.log'}")
    return runs


def per_turn_perplexity(args, eval_file: Path, adapter: Path | None) -> dict[str, Any]:
    """Response perplexity of the evaluation conversations' assistant turns, by turn position and over all."""
    import torch

    torch.set_num_threads(1)

    from peftlab.evaluate import eval_config, load_for_eval
    from peftlab.precision import compute_context
    from peftlab.tasks import get_task

    overrides = {} if adapter else {"model": args.model, "task": "instruction", "dataset": str(eval_file),
                                    "max_length": args.max_length, "precision": "fp32"}
    cfg = eval_config(str(adapter) if adapter else None, {**overrides, "eval_dataset": str(eval_file),
                                                           "eval_subset": args.eval, "threads": 1})
    task = get_task("instruction")(cfg)
    raw = task.load()
    loaded, model = load_for_eval(cfg, str(adapter) if adapter else None, "auto")
    data = task.prepare(raw, loaded.tokenizer, model)
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    with torch.no_grad(), compute_context(loaded.precision, loaded.device.type):
        for enc in data.eval_enc:
            ids = torch.tensor([enc.ids], device=loaded.device)
            logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
            token_nll = -logp[:-1].gather(1, ids[0, 1:, None])[:, 0]  # token_nll[t - 1]: predicting ids[t]
            for turn, (start, stop) in enumerate(enc.learned_spans, start=1):
                nll = float(token_nll[start - 1:stop - 1].sum())
                for key in (f"turn {turn}", "last turn" if turn == len(enc.learned_spans) else None, "all turns"):
                    if key:
                        sums[key][0] += nll
                        sums[key][1] += stop - start
    return {key: {"perplexity": math.exp(nll / tokens), "tokens": tokens} for key, (nll, tokens) in
            sorted(sums.items())}


def learned_tokens(args, train_file: Path) -> dict[str, int]:
    """Tokens that carry loss in the training set under each chat_loss (the input tokens are the same)."""
    from peftlab.configure import load_config
    from peftlab.data.sources import DataSplit
    from peftlab.models import load_tokenizer, resolve_model_source
    from peftlab.prompts import PromptEncoder, choose_template
    from peftlab.tasks.instruction import parse_split

    records = [json.loads(line) for line in train_file.read_text(encoding="utf-8").splitlines()]
    examples, _ = parse_split(DataSplit(records, f"file:{train_file}", "train", "-"))
    tokenizer = load_tokenizer(resolve_model_source(args.model), load_config(None, {"model": args.model}))
    encoder = PromptEncoder(tokenizer, choose_template("auto", tokenizer), args.max_length)
    out = {}
    for mode in MODES:
        encoded = [e for e in (encoder.encode(x, mode) for x in examples) if e is not None]
        out[mode] = {"conversations": len(encoded), "input": sum(len(e.ids) for e in encoded),
                     "loss": sum(b - a for e in encoded for a, b in e.learned_spans)}
    return out


def run_summary(run: Path) -> dict[str, Any]:
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    tail = losses[-max(1, len(losses) // 5):]
    return {"optimizer_steps": results["timing"]["optimizer_steps"], "tokens_trained": results["timing"][
        "tokens_trained"], "train_loss_first": losses[0], "train_loss_last_fifth": sum(tail) / len(tail),
        "learned_turns": results["data"].get("learned_turns")}


def markdown(result: dict[str, Any]) -> str:
    setup = result["setup"]
    turns = sorted(result["perplexity"]["base"])
    lines = ["# Multi-turn chat: every assistant turn learned against only the last", "",
             f"{setup['model']} LoRA (peftlab defaults, lr {setup['lr']}), {setup['train_conversations']} training "
             f"conversations chained from alpaca-libre train (2-3 exchanges each), 1 epoch, batch "
             f"{setup['batch_size']} x accumulation {setup['grad_accum']}, max_length {setup['max_length']}, fp32; "
             f"evaluated on {setup['eval_conversations']} conversations chained from alpaca-libre test.", "",
             "Response perplexity of the evaluation conversations' assistant turns (lower is better):", "",
             "| model | " + " | ".join(turns) + " |", "|---|" + "---|" * len(turns)]
    for name, row in result["perplexity"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[t]['perplexity']:.3f}" for t in turns) + " |")
    lines += ["", "| run | conversations | optimizer steps | input tokens | loss tokens | train loss (first step) | "
              "train loss (last fifth of steps) |", "|---|---|---|---|---|---|---|"]
    for mode in MODES:
        run, tokens = result["runs"][mode], result["tokens"][mode]
        lines.append(f"| chat_loss={mode} | {tokens['conversations']} | {run['optimizer_steps']} | {tokens['input']} | "
                     f"{tokens['loss']} | {run['train_loss_first']:.4f} | {run['train_loss_last_fifth']:.4f} |")
    lines += ["", "chat_loss=last drops a conversation whose last prompt does not fit max_length (it has nothing to "
              "learn); chat_loss=all keeps it, cut, for the answers that fit."]
    lines += ["", "The training losses average over different tokens (every answer, or the last answer of each "
              "conversation), so they are not comparable with each other; the perplexities above are, as every "
              "model is scored on the same turns.", "", "```bash", result["command"], "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "chat-turns")
    parser.add_argument("--results", type=Path, default=None, help="where results.json/.md go (default: OUT)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get(
        "PEFTLAB_DATA_DIR", REPO.parent / "shared" / "datasets")) / "alpaca-libre")
    parser.add_argument("--train", type=int, default=200, help="training conversations")
    parser.add_argument("--eval", type=int, default=60, help="evaluation conversations")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--reuse", action="store_true", help="score the runs already in OUT instead of training")
    args = parser.parse_args()
    args.out = args.out.absolute()
    results_dir = (args.results or args.out).absolute()

    train_file = write_jsonl(args.out / "data" / "train.jsonl",
                             chain(alpaca_rows(args.data / "train.jsonl"), args.train, seed=0))
    eval_file = write_jsonl(args.out / "data" / "eval.jsonl",
                            chain(alpaca_rows(args.data / "test.jsonl"), args.eval, seed=1))
    runs = {mode: args.out / "runs" / f"chat-loss-{mode}" for mode in MODES}
    if not (args.reuse and all((run / "results.json").is_file() for run in runs.values())):
        runs = train_both(args, train_file, eval_file)
    models = {"base": None, **{f"chat_loss={mode}": runs[mode] / "adapter" for mode in MODES}}
    with ProcessPoolExecutor(len(models), mp_context=multiprocessing.get_context("spawn")) as pool:
        scored = {name: pool.submit(per_turn_perplexity, args, eval_file, adapter) for name, adapter in
                  models.items()}
        perplexity = {name: future.result() for name, future in scored.items()}
    command = "python benchmarks/chat_turns.py " + " ".join(a for a in sys.argv[1:] if a != "--reuse")
    result = {"setup": {"model": args.model, "train_conversations": args.train, "eval_conversations": args.eval,
                        "batch_size": args.batch_size, "grad_accum": args.grad_accum, "lr": args.lr,
                        "max_length": args.max_length, "data": str(args.data.name)},
              "tokens": learned_tokens(args, train_file), "runs": {m: run_summary(r) for m, r in runs.items()},
              "perplexity": perplexity, "command": command.strip()}
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (results_dir / "results.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))


if __name__ == "__main__":
    main()
