"""What the report says in words (``peftlab.report.findings``), its machine-time line, and ``--readme``: on hand-made
stores whose numbers give the expected sentences by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_report import clm_values, make_results, make_store, write_values

from peftlab.cli import main
from peftlab.report import build_tables, read_sweep, write_report
from peftlab.report.findings import base_checks, machine_time, table_findings
from peftlab.report.markdown import README_END, README_START
from peftlab.report.tables import number
from peftlab.stats import bootstrap_ci, exp_ratio_of
from peftlab.sweep.runner import CALIBRATION_FILE

RNG = np.random.default_rng(0)
BASE = RNG.uniform(20, 40, 64)  # NLL of 64 blocks of 10 tokens


def ppl(values) -> float:
    return float(np.exp(np.sum(values) / (10 * len(values))))


@pytest.fixture
def clm_sweep(tmp_path):
    """Full halves the NLL, LoRA (8, 16) takes 0.6 of it, LoRA (4, 8) leaves it as the base had it."""
    values = {"full": BASE * 0.5, "lora-r8": BASE * 0.6, "lora-r4": BASE * 1.0}
    shapes = {"full": ("full", 8, 16, 120.0, 4.0), "lora-r8": ("lora", 8, 16, 60.0, 2.0),
              "lora-r4": ("lora", 4, 8, 30.0, 1.5)}
    runs = []
    for rid, (method, r, alpha, epoch_s, memory) in shapes.items():
        runs.append((rid, make_results(rid, task="clm", method=method, seed=1, r=r, alpha=alpha, epoch_s=epoch_s,
                                       memory=memory, after={"perplexity": ppl(values[rid])},
                                       before={"perplexity": ppl(BASE), "baseline_key": "k1"})))
    folder = make_store(tmp_path / "sweep", runs)
    for rid, v in values.items():
        write_values(folder, rid, clm_values(list(v)), clm_values(list(BASE)))
    return folder


def test_each_row_against_its_base_interval(clm_sweep):
    (table,) = build_tables(read_sweep(clm_sweep).finished)
    checks = {c.group.runs[0].id: c for c in base_checks(table, table.metric_column)}
    base = bootstrap_ci(exp_ratio_of(BASE, [10] * 64), 64)
    assert checks["full"].base == base
    assert checks["full"].beyond and checks["lora-r8"].beyond
    assert not checks["lora-r4"].beyond  # unchanged: inside its base's interval
    said = table_findings(table)[0]
    assert said.startswith("Perplexity: not beyond the base's 95% interval: LoRA (4, 8) ")
    assert f"against its base's [{number(base.lo)}, {number(base.hi)}]" in said
    assert said.endswith("Beyond it: Full, LoRA (8, 16).")


def test_shares_of_full_gain_memory_order_and_time(clm_sweep):
    (table,) = build_tables(read_sweep(clm_sweep).finished)
    said = table_findings(table)
    base, full, lora = ppl(BASE), ppl(BASE * 0.5), ppl(BASE * 0.6)
    share = 100 * (lora - base) / (full - base)
    assert (f"Full moves Perplexity {number(base)} → {number(full)}; the share of that gain each row reaches: "
            f"LoRA (4, 8) 0%, LoRA (8, 16) {round(share)}%.") in said
    assert "Memory (GB), lowest first: LoRA (4, 8) 1.50, LoRA (8, 16) 2.00, Full 4.00." in said
    assert "Time per epoch relative to full fine-tuning: Full 2.00 min; LoRA (4, 8) 0.25x, LoRA (8, 16) 0.50x." \
        in said
    significant = next(s for s in said if s.startswith("Perplexity against LoRA (8, 16)"))
    assert "Full" in significant.split(";")[0] and "LoRA (4, 8)" in significant.split(";")[0]


def test_machine_time_against_the_calibration(clm_sweep):
    records = read_sweep(clm_sweep)
    full = next(r for r in records.finished if r.id == "full")  # the store's definition: its sweep fields
    rows = [{"fields": {**full.definition, "seed": 7}, "seconds": 5.0}]  # seeds share a row
    (clm_sweep / CALIBRATION_FILE).write_text(json.dumps({"rows": rows}))
    mt = machine_time(records.finished, clm_sweep)
    assert (mt.runs, mt.seconds) == (3, 30.0)  # make_store marks every run done after 10 s
    assert (mt.calibrated_runs, mt.calibrated_seconds, mt.measured_of_calibrated) == (1, 5.0, 10.0)
    assert mt.ratio == 2.0
    text = write_report(clm_sweep, clm_sweep / "report").markdown.read_text()
    assert "Machine time: the 3 finished runs (of 3) took 0.01 h" in text
    assert "measured / estimate = 2.00." in text


def test_readme_section_replaced_between_its_markers(clm_sweep, tmp_path):
    readme = tmp_path / "docs" / "README.md"
    readme.parent.mkdir()
    readme.write_text(f"# Title\n\nbefore\n\n{README_START}\nold numbers\n{README_END}\n\nafter\n")
    assert main(["report", str(clm_sweep), "--output-dir", str(tmp_path / "out"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n\n" + README_START) and text.endswith(README_END + "\n\nafter\n")
    assert "old numbers" not in text and "| smollm2-135m | Full |" in text
    assert "![clm on wikitext-2-raw-v1: speed](../out/plots/clm-wikitext-2-raw-v1-speed.png)" in text
    assert "What the numbers say:" in text
    again = readme.read_text()
    assert main(["report", str(clm_sweep), "--output-dir", str(tmp_path / "out"), "--readme", str(readme)]) == 0
    assert readme.read_text() == again  # regenerating gives the same file


def test_readme_without_markers_is_a_one_line_error(clm_sweep, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    assert main(["report", str(clm_sweep), "--output-dir", str(tmp_path / "out"), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--readme" in err and README_START in err
    assert not (tmp_path / "out").exists()  # nothing written
    assert readme.read_text() == "# no markers\n"


def test_report_keeps_each_runs_config_and_records(tmp_path):
    from peftlab.configure import load_config

    resolved = load_config(None, {"model": "smollm2-135m", "method": "lora", "r": 16, "alpha": 32, "seed": 3,
                                  "train_subset": 64}).model_dump(mode="json")
    res = make_results("x", task="clm", method="lora", seed=3, r=16, alpha=32, after={"perplexity": 9.0})
    res["config"] = resolved
    folder = make_store(tmp_path / "sweep", [("clm-lora-r16-a32-seed3", res)])
    made = write_report(folder, tmp_path / "out")
    (path,) = made.configs
    assert path == tmp_path / "out" / "configs" / "clm-lora-r16-a32-seed3.yaml"
    assert load_config(str(path), {}).model_dump(mode="json") == resolved
    kept = tmp_path / "out" / "records"
    assert json.loads((kept / "clm-lora-r16-a32-seed3" / "results.json").read_text())["config"] == resolved
    assert (kept / "clm-lora-r16-a32-seed3" / "metrics.jsonl").read_text() == (
        folder / "runs" / "clm-lora-r16-a32-seed3" / "metrics.jsonl").read_text()
    index = json.loads((kept / "index.json").read_text())
    assert index["runs"] == [{"id": "clm-lora-r16-a32-seed3", "wall_s": 10.0, "definition": res["config"]}]
    # beside the results too: a sweep that adopts the copied-back run keeps its measured time
    assert json.loads((kept / "clm-lora-r16-a32-seed3" / "sweep_wall.json").read_text()) == {"wall_s": 10.0}


def test_relations_across_tables(clm_sweep):
    from peftlab.report.findings import relations

    tables = build_tables(read_sweep(clm_sweep).finished)
    base, full, lora = ppl(BASE), ppl(BASE * 0.5), ppl(BASE * 0.6)
    memory, shares = relations(tables)
    assert memory == ("Memory (GB) by training type, lowest first (rows of one type averaged): clm on "
                      "wikitext-2-raw-v1 (smollm2-135m): LoRA 1.75 < Full 4.00.")
    assert shares == ("Share of full fine-tuning's gain over the base, by row: LoRA (4, 8): clm on wikitext-2-raw-v1 "
                      f"(smollm2-135m) 0%; LoRA (8, 16): clm on wikitext-2-raw-v1 (smollm2-135m) "
                      f"{round(100 * (lora - base) / (full - base))}%.")
    text = write_report(clm_sweep, clm_sweep / "report").markdown.read_text()
    assert "## Across the tables" in text and memory in text


def test_runs_on_two_machines_are_named_in_the_report(tmp_path):
    """A study resumed on another host: the overview says which runs ran where, and the table warns that its
    times compare only within one machine."""
    xeon = {"cpu": "Xeon X", "cpu_count": 2, "torch_threads": 2, "cpu_native_bf16": "amx_bf16"}
    epyc = {"cpu": "EPYC Y", "cpu_count": 2, "torch_threads": 2, "cpu_native_bf16": "avx512_bf16"}
    runs = []
    for rid, seed, machine in (("lora-s1", 1, xeon), ("lora-s2", 2, epyc), ("full-s1", 1, xeon)):
        res = make_results(rid, task="clm", method="full" if rid.startswith("full") else "lora", seed=seed,
                           after={"perplexity": 20.0 + seed})
        res["machine"] = machine
        runs.append((rid, res))
    folder = make_store(tmp_path / "sweep", runs)
    text = write_report(folder, tmp_path / "out").markdown.read_text()
    assert ("Measured on 2 machines: Xeon X, 2 cores, 2 torch threads, native bf16: amx_bf16 (2 runs); EPYC Y, "
            "2 cores, 2 torch threads, native bf16: avx512_bf16 (1 run: lora-s2). Times and memory compare only "
            "between runs on one machine.") in text
    (table,) = build_tables(read_sweep(folder).finished)
    assert table_findings(table)[-1] == (
        "This table's runs were measured on more than one machine, so its times (and tokens/s) are not comparable "
        "across them: Xeon X ran 2 runs; EPYC Y ran LoRA (8, 16) seed 2.")


def _two_machine_sweep(tmp_path):
    xeon = {"cpu": "Xeon X", "cpu_count": 2, "torch_threads": 2}
    epyc = {"cpu": "EPYC Y", "cpu_count": 2, "torch_threads": 2}
    runs = []
    for rid, seed, machine, epoch_s in (("lora-s1", 1, xeon, 60.0), ("lora-s2", 2, epyc, 90.0),
                                        ("full-s1", 1, xeon, 120.0)):
        res = make_results(rid, task="clm", method="full" if rid.startswith("full") else "lora", seed=seed,
                           after={"perplexity": 20.0 + seed}, epoch_s=epoch_s, tokens_per_s=100.0 * seed)
        res["machine"] = machine
        runs.append((rid, res))
    return make_store(tmp_path / "sweep", runs)


def test_a_table_over_two_machines_blanks_its_speed_cells(tmp_path):
    """Time per epoch and tokens/s compare only within one machine: blank, with a note, and no speed plot; the
    metric and memory columns stay."""
    folder = _two_machine_sweep(tmp_path)
    (table,) = build_tables(read_sweep(folder).finished)
    heads = table.headers()
    for group in table.groups:
        cells = dict(zip(heads, table.cells(group), strict=True))
        assert cells["Time/Epoch (min) ↓"] == "n/a" and cells["Tokens/s ↑"] == "n/a"
        assert cells["Perplexity ↓"] != "n/a" and cells["Memory (GB) ↓"] != "n/a"
    assert any(n.startswith("Time/Epoch (min) and Tokens/s: left blank (n/a), since this table's runs were "
                            "measured on 2 machines (EPYC Y; Xeon X)") for n in table.notes)
    assert not any(s.startswith("Time per epoch relative") for s in table_findings(table))
    made = write_report(folder, tmp_path / "out")
    assert not any(p.name.endswith("-speed.png") for p in made.plots)


def test_mixed_machines_keeps_the_speed_cells(tmp_path):
    folder = _two_machine_sweep(tmp_path)
    (table,) = build_tables(read_sweep(folder).finished, mixed_machines=True)
    full = next(g for g in table.groups if g.first.method.name == "full")
    cells = dict(zip(table.headers(), table.cells(full), strict=True))
    assert cells["Time/Epoch (min) ↓"] == "2.00"
    assert not any("left blank" in n for n in table.notes)
    assert main(["report", str(folder), "--output-dir", str(tmp_path / "out"), "--mixed-machines"]) == 0
    assert any(p.name.endswith("-speed.png") for p in (tmp_path / "out" / "plots").iterdir())


def test_seed_table_fills_the_seeds_layout_with_intervals(tmp_path, capsys):
    """`peftlab report --seed-table`: the seed's six columns from the measured rows, the metric with its bootstrap
    interval, time and memory with a t-interval over seeds, and the seed's claims with what rules them out."""
    from peftlab.report.seed_layout import seed_interval

    runs = []
    for seed, epoch_s in ((1, 60.0), (2, 72.0)):
        runs.append((f"lora-s{seed}", make_results(f"lora-s{seed}", task="clm", method="lora", seed=seed,
                                                   epoch_s=epoch_s, after={"perplexity": 20.0 + seed})))
    folder = make_store(tmp_path / "sweep", runs)
    assert main(["report", str(folder), "--output-dir", str(tmp_path / "out"), "--seed-table"]) == 0
    text = (tmp_path / "out" / "seed_table.md").read_text()
    assert text in capsys.readouterr().out
    lo, hi = seed_interval([1.0, 1.2])
    row = next(line for line in text.splitlines() if line.startswith("| smollm2-135m | LoRA | (8, 16) |"))
    assert f"| 1.10 [{lo:.2f}, {hi:.2f}] (2 seeds) |" in row
    assert "| Model | Training Type | (r, α) | Time/Epoch (min) ↓ | Perplexity ↓ | Memory (GB) ↓ |" in text
    assert ("| Llama-2-7B | LoRA | 8 | 9 GB | not possible on one GPU: the frozen base's 6.74 B parameters in 16 "
            "bits take 13.5 GB") in text
    assert seed_interval([3.0]) is None
