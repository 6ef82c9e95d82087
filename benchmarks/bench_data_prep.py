"""Data-preparation benchmark: tokenize + group WikiText-2 into blocks, peftlab vs the seed's recipe.

- peftlab: ``peftlab.tasks.clm.tokenize_to_blocks`` (batched tokenizer calls, one linear concatenation into a numpy
  array), what ``peftlab train`` runs on a cache miss (a cache hit is a memory-mapped ``np.load``, timed too).
- seed: the Hugging Face run_clm recipe: ``datasets.Dataset.map(tokenize, batched=True)`` then
  ``map(group_texts, batched=True)`` where group_texts concatenates with ``sum(examples[k], [])`` and adds
  ``labels``.

Output check: the seed's recipe, with ``datasets.map``'s default batches of 1000 lines, drops each batch's remainder,
so its blocks drift from a global concatenation; the check therefore runs it once over the whole split in one
batch (``batch_size=None``), where the recipe means the same thing as peftlab's, and requires equal arrays. The
timed seed runs use the default batches, as the seed does. Both tokenize with the same tokenizer object.

    python benchmarks/bench_data_prep.py --out bench-results/data_prep          # smollm2 tokenizer, 5 repeats
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as `peftlab train` runs (cli.py)


def seed_recipe(texts: list[str], tokenizer, block_size: int, batch_size: int | None = 1000) -> np.ndarray:
    """The seed's tokenize + group_texts on datasets.map (HF run_clm), returned as an int64 array of blocks."""
    from datasets import Dataset

    def tokenize_function(examples):
        return tokenizer(examples["text"])

    def group_texts(examples):
        concatenated = {k: sum(examples[k], []) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {k: [t[i:i + block_size] for i in range(0, total_length, block_size)]
                  for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    raw = Dataset.from_dict({"text": texts})
    tokenized = raw.map(tokenize_function, batched=True, batch_size=batch_size, remove_columns=["text"])
    grouped = tokenized.map(group_texts, batched=True, batch_size=batch_size)
    return np.asarray(grouped["input_ids"], dtype=np.int64).reshape(-1, block_size)


def peftlab_recipe(texts: list[str], tokenizer, block_size: int) -> np.ndarray:
    """peftlab's tokenize_to_blocks (the work behind its block cache)."""
    from peftlab.tasks.clm import tokenize_to_blocks

    return tokenize_to_blocks(texts, tokenizer, block_size)


def timed(fn, repeats: int) -> dict[str, Any]:
    """Median and min-max wall time of ``repeats`` calls (after one untimed warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


def cached_load_time(blocks: np.ndarray, repeats: int) -> dict[str, Any]:
    """What a cache hit costs in peftlab: np.load of the saved blocks, memory-mapped."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "blocks.npy"
        np.save(path, blocks)
        return timed(lambda: np.load(path, mmap_mode="r"), repeats)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="folder for results.json and results.md (optional)")
    p.add_argument("--model", default="smollm2-135m", help="whose tokenizer (peftlab alias or folder)")
    p.add_argument("--split", default="train", choices=["train", "eval"],
                   help="WikiText-2 split as peftlab resolves it offline (train = validation.txt)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--limit", type=int, default=None, help="use only the first N lines (smoke tests)")
    args = p.parse_args(argv)

    from datasets import disable_progress_bars

    from peftlab.configure import load_config
    from peftlab.data.sources import load_splits
    from peftlab.models import load_tokenizer, resolve_model_source
    from peftlab.record import machine_info, package_versions

    disable_progress_bars()
    repo = Path(__file__).resolve().parents[1]
    if not os.environ.get("PEFTLAB_DATA_DIR") and (repo.parent / "shared" / "datasets").is_dir():
        os.environ["PEFTLAB_DATA_DIR"] = str(repo.parent / "shared" / "datasets")
    cfg = load_config(None, {"model": args.model, "dataset": "wikitext-2-raw-v1", "block_size": args.block_size})
    plan = load_splits(cfg)
    split = plan.train if args.split == "train" else plan.eval
    texts = [str(r[cfg.text_column]) for r in split.records][: args.limit]
    tokenizer = load_tokenizer(resolve_model_source(args.model), cfg)

    ours = peftlab_recipe(texts, tokenizer, args.block_size)
    reference = seed_recipe(texts, tokenizer, args.block_size, batch_size=None)
    equal = bool(ours.shape == reference.shape and np.array_equal(ours, reference))
    seed_default = seed_recipe(texts, tokenizer, args.block_size)

    t_ours = timed(lambda: peftlab_recipe(texts, tokenizer, args.block_size), args.repeats)
    t_seed = timed(lambda: seed_recipe(texts, tokenizer, args.block_size), args.repeats)
    t_cache = cached_load_time(ours, args.repeats)
    report = {
        "source": split.source, "lines": len(texts), "block_size": args.block_size, "repeats": args.repeats,
        "tokenizer": str(resolve_model_source(args.model)),
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
        "blocks": {"peftlab": int(len(ours)), "seed_one_batch": int(len(reference)),
                   "seed_default_batches": int(len(seed_default))},
        "output_equal": equal,
        "peftlab_tokenize_group": t_ours, "seed_tokenize_group": t_seed, "peftlab_cache_hit": t_cache,
        "speedup_seed_over_peftlab": t_seed["median_s"] / t_ours["median_s"],
        "machine": machine_info(), "versions": package_versions(),
    }
    table = "\n".join([
        "| data preparation | median s | min-max s | blocks |", "|---|---|---|---|",
        f"| seed: datasets.map + group_texts (sum) | {t_seed['median_s']:.3f} | {t_seed['min_s']:.3f}-"
        f"{t_seed['max_s']:.3f} | {len(seed_default)} |",
        f"| peftlab: tokenize_to_blocks | {t_ours['median_s']:.3f} | {t_ours['min_s']:.3f}-{t_ours['max_s']:.3f} "
        f"| {len(ours)} |",
        f"| peftlab: cache hit (np.load, mmap) | {t_cache['median_s']:.5f} | {t_cache['min_s']:.5f}-"
        f"{t_cache['max_s']:.5f} | {len(ours)} |",
        "",
        f"- peftlab is {report['speedup_seed_over_peftlab']:.2f}x faster than the seed's recipe "
        f"({len(texts)} lines of {split.source}, block size {args.block_size}, {args.repeats} timed repeats, "
        f"TOKENIZERS_PARALLELISM={report['tokenizers_parallelism']}).",
        f"- Same output: {'yes' if equal else 'NO'} (peftlab vs the seed's recipe over the whole split in one batch; "
        f"with the default 1000-line batches the seed drops each batch's remainder and keeps "
        f"{len(seed_default)} blocks instead of {len(ours)}).",
    ]) + "\n"
    if args.out:
        from _common import write_json

        write_json(args.out / "results.json", report)
        (args.out / "results.md").write_text(table, encoding="utf-8")
    print(table)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
