"""`peftlab report` on a hand-made store: tables (mean ± std, directions, notes), plots, and the HTML page rendered in
headless Chromium with every image loaded."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from peftlab.cli import main
from peftlab.errors import UserError
from peftlab.per_example import write_stage
from peftlab.record import RunRecord
from peftlab.report import build_tables, markdown_table, read_sweep, write_report
from peftlab.report.tables import number
from peftlab.stats import bootstrap_ci, exp_ratio_of, mean_over, paired_bootstrap
from peftlab.sweep.store import SweepStore
from peftlab.tasks.base import Evaluation, ExampleValues

matplotlib.use("Agg")

CLM_DATA = {"train": {"source": "mirror:wikitext-2-raw-v1/validation.txt", "blocks_used": 64, "blocks_total": 2085},
            "eval": {"source": "mirror:wikitext-2-raw-v1/test.txt", "blocks_used": 16, "blocks_total": 2370},
            "notes": ["trained on 'validation', evaluated on 'test'"]}
CLS_DATA = {"train": {"source": "mirror:sst2/train.tsv", "examples_used": 512, "examples_total": 67349},
            "eval": {"source": "mirror:sst2/dev.tsv", "examples_used": 256, "examples_total": 872}, "notes": []}


def make_results(run_id: str, *, task: str, method: str, seed: int, after: dict, before: dict | None = None,
                 r: int = 8, alpha: float = 16, epoch_s: float = 60.0, memory: float = 1.0, trainable: int = 1000,
                 total: int = 100_000, tokens_per_s: float = 200.0, model: str = "smollm2-135m") -> dict:
    """A results.json with the fields the report reads, filled with chosen numbers."""
    metric, better, dataset, data = {"clm": ("perplexity", False, "wikitext-2-raw-v1", CLM_DATA),
                                     "classification": ("accuracy", True, "sst2", CLS_DATA),
                                     "instruction": ("rougeL", True, "alpaca-libre", {})}[task]
    config = {"model": model, "task": task, "dataset": dataset, "method": method, "r": r, "alpha": alpha,
              "seed": seed, "lr": 2e-4, "train_subset": 64, "generation_subset": 8, "max_new_tokens": 32}
    return {"schema": 1, "status": "done", "run_dir": f"/elsewhere/{run_id}", "config": config,
            "model": {"name": model}, "method": {"name": method, "r": r, "alpha": alpha},
            "task": {"name": task, "metric": metric, "higher_is_better": better}, "data": data,
            "params": {"trainable_params": trainable, "total_params": total,
                       "trainable_percent": 100 * trainable / total},
            "metrics": {"before": before, "after": after},
            "timing": {"time_per_epoch_s": epoch_s, "tokens_per_s": tokens_per_s},
            "memory": {"headline_gb": memory, "headline_kind": "cpu_peak_rss_train"}, "seed": seed}


def make_store(folder: Path, runs: list[tuple[str, dict]], failed: tuple[str, str] | None = None) -> Path:
    """A sweep folder with a store holding these done runs (and a failed one), and loss curves."""
    store = SweepStore.open(folder)
    store.set_meta({"fingerprint": "test", "name": "hand-made", "description": "numbers chosen by hand"})
    store.add_runs([(rid, res["config"]) for rid, res in runs] + ([(failed[0], {})] if failed else []))
    for i, (rid, res) in enumerate(runs):
        store.mark_running(rid, None)
        store.mark_done(rid, RunRecord.from_dict(res), 10.0, 0)
        run_dir = folder / "runs" / rid
        run_dir.mkdir(parents=True)
        rows = [{"step": s, "epoch": s / 4, "loss": 3.0 - 0.2 * s - 0.1 * i} for s in range(1, 5)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if failed:
        store.mark_running(failed[0], None)
        store.mark_failed(failed[0], failed[1], 3.0, 2, "")
    store.close()
    return folder


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    clm = [
        ("clm-full-seed1", make_results("a", task="clm", method="full", seed=1, after={"perplexity": 10.0},
                                        before={"perplexity": 30.0}, epoch_s=60, memory=2.0, trainable=100_000)),
        ("clm-full-seed2", make_results("b", task="clm", method="full", seed=2, after={"perplexity": 12.0},
                                        before={"perplexity": 30.0}, epoch_s=120, memory=2.5, trainable=100_000)),
        ("clm-lora-seed1", make_results("c", task="clm", method="lora", seed=1, after={"perplexity": 14.0},
                                        before={"perplexity": 30.0}, epoch_s=30, memory=1.0)),
        ("clm-qlora-seed1", make_results("d", task="clm", method="qlora", seed=1, after={"perplexity": 15.0},
                                         before={"perplexity": 31.0}, epoch_s=45, memory=0.5)),
    ]
    cls = [
        ("sst2-lora-r4", make_results("e", task="classification", method="lora", r=4, alpha=16, seed=1,
                                      after={"accuracy": 0.75, "macro_f1": 0.70}, before={"accuracy": 0.5})),
        ("sst2-lora-r8", make_results("f", task="classification", method="lora", r=8, alpha=32, seed=1,
                                      after={"accuracy": 0.80, "macro_f1": 0.78}, before={"accuracy": 0.5})),
    ]
    inst = [("alpaca-lora", make_results("g", task="instruction", method="lora", seed=1,
                                         after={"rougeL": 0.25, "bleu": 5.5, "exact_match": 0.0,
                                                "perplexity": 8.25}))]
    return make_store(tmp_path / "sweep", clm + cls + inst,
                      failed=("clm-bad", "target_modules: the model has no linear module named nope"))


def test_tables_follow_the_seed_layout_with_mean_and_std(sweep_dir):
    tables = {t.task: t for t in build_tables(read_sweep(sweep_dir).finished)}
    assert sorted(tables) == ["classification", "clm", "instruction"]
    clm = markdown_table(tables["clm"]).splitlines()
    assert clm[0] == ("| Model | Training Type | LoRA Config (r, alpha) | Time/Epoch (min) ↓ | Perplexity ↓ | "
                      "95% CI | Δ vs LoRA (8, 16) (95% CI) | Memory (GB) ↓ | Trainable % | Tokens/s ↑ | Seeds |")
    # full: perplexity 10 and 12 -> mean 11, sample std sqrt(2) = 1.4142; time 1 and 2 min -> 1.50 ± 0.71;
    # memory 2.0 and 2.5 -> 2.25 ± 0.35; trainable 100000 of 100000 = 100 % (no spread); tokens/s 200 both
    # these runs have no per-example values (older runs): the intervals are '-'; LoRA (8, 16) is the reference
    assert clm[2] == ("| smollm2-135m | Full | - | 1.50 ± 0.71 | **11.00 ± 1.41** | - | - | 2.25 ± 0.35 | 100 | "
                      "200 ± 0 | 2 |")
    assert clm[3] == "| smollm2-135m | LoRA | (8, 16) | 0.50 | 14.00 | - | reference | 1.00 | 1 | 200 | 1 |"
    assert clm[4] == "| smollm2-135m | QLoRA | (8, 16) | 0.75 | 15.00 | - | - | 0.50 | 1 | 200 | 1 |"
    cls = markdown_table(tables["classification"]).splitlines()
    assert "Accuracy ↑" in cls[0] and "F1 (macro) ↑" in cls[0] and "Seeds" not in cls[0]
    assert "Δ vs LoRA (4, 16) (95% CI)" in cls[0]  # no LoRA (8, 16) row: the first plain LoRA is the reference
    assert cls[3] == "| smollm2-135m | LoRA | (8, 32) | 1.00 | **0.8000** | - | - | 1.00 | 1 | 200 | 0.7800 |"
    inst = markdown_table(tables["instruction"]).splitlines()[0]
    assert inst.endswith("| ROUGE-L ↑ | 95% CI | Δ vs LoRA (8, 16) (95% CI) | Memory (GB) ↓ | Trainable % | "
                         "Tokens/s ↑ | BLEU ↑ | Exact match ↑ | "
                         "Perplexity ↓ |")


def test_notes_state_subsets_baselines_and_best(sweep_dir):
    tables = {t.task: t for t in build_tables(read_sweep(sweep_dir).finished)}
    notes = "\n".join(tables["clm"].notes)
    assert ("Data: train: mirror:wikitext-2-raw-v1/validation.txt (64 of 2085 blocks); "
            "eval: mirror:wikitext-2-raw-v1/test.txt (16 of 2370 blocks).") in notes
    assert "Data note: trained on 'validation', evaluated on 'test'." in notes
    assert "Before training (base model smollm2-135m, same evaluation data): Perplexity ↓ 30.00." in notes
    assert "Before training (4-bit base smollm2-135m, same evaluation data): Perplexity ↓ 31.00." in notes
    assert "Best Perplexity (lower is better): Full." in notes
    assert "mean ± sample standard deviation" in notes
    assert "(512 of 67349 examples)" in "\n".join(tables["classification"].notes)
    assert "Generation metrics: 8 evaluation examples, up to 32 new tokens." in tables["instruction"].notes


def test_report_writes_tables_plots_and_a_self_contained_html(sweep_dir, tmp_path):
    made = write_report(sweep_dir, tmp_path / "out")
    assert sorted(p.name for p in made.tables) == ["classification-sst2.md", "clm-wikitext-2-raw-v1.md",
                                                   "instruction-alpaca-libre.md"]
    kinds = ("speed", "memory", "params", "loss")
    for table in ("clm-wikitext-2-raw-v1", "classification-sst2", "instruction-alpaca-libre"):
        for kind in kinds:
            png = tmp_path / "out" / "plots" / f"{table}-{kind}.png"
            svg = png.with_suffix(".svg")
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert "<svg" in svg.read_text()
    page = made.html.read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == 12
    for uri in images:
        assert uri.startswith("data:image/png;base64,")
        assert base64.b64decode(uri.split(",", 1)[1])[:4] == b"\x89PNG"
    assert not re.search(r'(src|href)="(https?:|//|file:)', page)  # nothing to fetch
    assert "Perplexity ↓" in page and "no linear module named nope" in page
    assert page.count("<details>") == 7  # each finished run's config
    md = made.markdown.read_text()
    assert "![clm on wikitext-2-raw-v1: speed](plots/clm-wikitext-2-raw-v1-speed.png)" in md


def clm_values(nll: list[float], tokens: int = 10) -> ExampleValues:
    return ExampleValues({"blocks": {"nll": tuple(nll), "tokens": (tokens,) * len(nll)}})


def write_values(folder: Path, run_id: str, after: ExampleValues, before: ExampleValues | None = None,
                 baseline_key: str = "k1") -> None:
    """A run's eval_examples.json with these per-example values."""
    run_dir = folder / "runs" / run_id
    if before is not None:
        write_stage(run_dir, "clm", Evaluation("before", {"baseline_key": baseline_key}, examples=before))
    write_stage(run_dir, "clm", Evaluation("after", {}, examples=after))


def test_intervals_from_per_example_values(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.uniform(20, 40, 64)  # NLL of 64 blocks of 10 tokens
    ref, same, worse = base * 0.6, base * 0.6, base * 0.6 + rng.uniform(2, 4, 64)
    full = [base * 0.5, base * 0.52]  # two seeds

    def res(run_id, method, seed, values, r=8, alpha=16):
        ppl = float(np.exp(values.sum() / (10 * len(values))))
        return make_results(run_id, task="clm", method=method, seed=seed, r=r, alpha=alpha,
                            after={"perplexity": ppl}, before={"perplexity": float(np.exp(base.sum() / 640)),
                                                               "baseline_key": "k1"})

    runs = [("full-s1", res("a", "full", 1, full[0])), ("full-s2", res("b", "full", 2, full[1])),
            ("lora-r8", res("c", "lora", 1, ref)), ("lora-r16", res("d", "lora", 1, same, 16, 32)),
            ("lora-r4", res("e", "lora", 1, worse, 4, 8)), ("lora-old", res("f", "lora", 1, ref, 32, 64))]
    folder = make_store(tmp_path / "sweep", runs)
    for rid, values in (("full-s1", full[0]), ("full-s2", full[1]), ("lora-r8", ref), ("lora-r16", same),
                        ("lora-r4", worse)):  # lora-old has none: an older run
        write_values(folder, rid, clm_values(list(values)), clm_values(list(base)))
    (table,) = build_tables(read_sweep(folder).finished)
    rows = {g.runs[0].id: g for g in table.groups}

    ratio = [exp_ratio_of(v, [10] * 64) for v in full]
    expect = bootstrap_ci(mean_over(ratio), 64, 2000, 0)  # seeds pooled on the same resamples
    assert rows["full-s1"].stats.ci == expect
    assert rows["full-s1"].stats.ci.estimate == pytest.approx(np.mean([r["metrics"]["after"]["perplexity"]
                                                                       for _, r in runs[:2]]))
    diff = rows["full-s1"].stats.diff
    assert diff == paired_bootstrap(exp_ratio_of(ref, [10] * 64), mean_over(ratio), 64, 2000, 0)
    assert diff.hi < 0 and diff.excludes_zero  # full is clearly better (lower) than LoRA (8, 16)
    assert rows["lora-r16"].stats.diff.estimate == 0 and not rows["lora-r16"].stats.diff.excludes_zero
    assert rows["lora-r4"].stats.diff.lo > 0 and rows["lora-r8"].stats.is_reference
    assert rows["lora-old"].stats.ci is None and rows["lora-old"].stats.diff is None

    lines = {line.split(" | ")[2] + line.split(" | ")[1]: line for line in markdown_table(table).splitlines()[2:]}
    assert lines["-Full"].split(" | ")[5] == f"[{number(expect.lo)}, {number(expect.hi)}]"
    assert lines["-Full"].split(" | ")[6].endswith(" *")
    assert lines["(16, 32)LoRA"].split(" | ")[6] == "0.0000 [0.0000, 0.0000]"
    assert lines["(8, 16)LoRA"].split(" | ")[6] == "reference"
    assert lines["(32, 64)LoRA"].split(" | ")[5:7] == ["-", "-"]
    notes = "\n".join(table.notes)
    base_ci = bootstrap_ci(exp_ratio_of(base, [10] * 64), 64)  # one shared baseline (key k1), counted once
    assert f"95% CI [{number(base_ci.lo)}, {number(base_ci.hi)}] over 64 blocks" in notes
    assert "2000 resamples, seed 0" in notes and "paired bootstrap" in notes

    from peftlab.report.plots import metric_error

    y = rows["full-s1"].stats.ci.estimate
    assert metric_error(rows["full-s1"], y, 1.0) == [[y - expect.lo], [expect.hi - y]]
    assert metric_error(rows["lora-old"], 5.0, 1.0) == [1.0]  # no values: ± std
    made = write_report(folder, tmp_path / "out")
    assert "95% CI" in made.markdown.read_text()


def test_plots_put_better_up(sweep_dir):
    import matplotlib.pyplot as plt

    from peftlab.report.plots import metric_axis

    tables = {t.task: t for t in build_tables(read_sweep(sweep_dir).finished)}
    for task, inverted in (("clm", True), ("classification", False)):
        fig, ax = plt.subplots()
        metric_axis(ax, tables[task], [10.0, 12.0])
        assert bool(ax.yaxis_inverted()) is inverted
        assert ("lower is better" if inverted else "higher is better") in ax.get_ylabel()
        plt.close(fig)


def test_report_without_finished_runs_is_a_one_line_error(tmp_path, capsys):
    store = SweepStore.open(tmp_path / "empty")
    store.add_runs([("a", {}), ("b", {})])
    store.mark_running("b", None)
    store.mark_failed("b", "boom", 1.0, 2, "")
    store.close()
    with pytest.raises(UserError, match=r"has no finished runs \(1 queued, 1 failed\)"):
        write_report(tmp_path / "empty")
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftlab: error: ") and err.count("\n") == 1
    with pytest.raises(UserError, match="no sweep.sqlite here"):
        write_report(tmp_path)


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IMAGE_CHECK = ('<script>window.addEventListener("load", function () {var imgs = [].slice.call(document.images);'
               'var ok = imgs.filter(function (i) {return i.complete && i.naturalWidth > 0;}).length;'
               'var p = document.createElement("p"); p.id = "imgcheck"; p.textContent = "IMAGES " + ok + "/" + '
               'imgs.length; document.body.appendChild(p);});</script>')


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
def test_html_renders_in_headless_chromium_with_every_image_loaded(sweep_dir, tmp_path):
    made = write_report(sweep_dir, tmp_path / "out")
    probe = made.html.with_name("imagecheck.html")  # a copy with a script that counts the loaded images
    probe.write_text(made.html.read_text().replace("</body>", IMAGE_CHECK + "</body>"))

    def chromium(*args: str) -> subprocess.CompletedProcess:
        profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
        profile.mkdir()
        return subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120)

    dom = chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r"IMAGES (\d+)/(\d+)", dom.stdout)
    assert found, dom.stderr[-2000:]
    assert found.group(1) == found.group(2) == "12"
    shot = made.folder / "report-screenshot.png"
    chromium("--window-size=1280,2400", f"--screenshot={shot}", made.html.as_uri())
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 2400)
