"""benchmarks/gpu_check.sh (issue 24) on CPU: its dry run goes through every row with tiny shapes while only the
packages of the device image and those its prepare step carries can be imported (the rest are blocked, as they are
missing there), and the answers are written; prepare carries what it lists, within the 64 MiB that travels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED_DATA

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(not (SHARED_DATA / "wikitext-2-raw-v1").is_dir(), reason="dataset mirror not found")

SITECUSTOMIZE = '''
import atexit, os, sys

BLOCKED = set({blocked!r})


class _NotOnTheDeviceImage:
    """Import of a package the device image lacks and prepare does not carry: fail as it would there."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the device image, not carried)")
        return None


sys.meta_path.insert(0, _NotOnTheDeviceImage())
import importlib.util  # noqa: E402

_find_spec = importlib.util.find_spec


def _probe(name, package=None):
    """Availability probes (``find_spec(name) is not None``) see a blocked package as absent, as there."""
    return None if name.partition(".")[0] in BLOCKED else _find_spec(name, package)


importlib.util.find_spec = _probe


def _record():
    with open(os.path.join({log!r}, f"{{os.getpid()}}.txt"), "w") as fh:
        fh.write("\\n".join(sorted({{m.partition(".")[0] for m in list(sys.modules)}})))


atexit.register(_record)
'''


def package_list(name: str) -> set[str]:
    lines = (REPO / "benchmarks" / name).read_text(encoding="utf-8").splitlines()
    return {normalise(line) for line in lines if line.strip() and not line.startswith("#")}


def normalise(dist: str) -> str:
    return dist.strip().lower().replace("_", "-").replace(".", "-")


def with_requirements(dists: set[str]) -> set[str]:
    """The distributions and, as installed here, everything they require (the image's own packages bring theirs
    there, at the image's versions: huggingface-hub's HTTP client, for one)."""
    import re
    from importlib.metadata import PackageNotFoundError, requires

    seen, todo = set(), list(dists)
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        try:
            reqs = requires(dist) or []
        except PackageNotFoundError:
            continue
        todo += [normalise(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]) for r in reqs if "extra ==" not in r]
    return seen


def blocked_modules() -> set[str]:
    """Top-level modules installed here whose distributions are neither on the device image (or required by its
    packages) nor carried."""
    allowed = (with_requirements(package_list("gpu_image_packages.txt")) | package_list("gpu_carry_packages.txt")
               | {"peftlab"})
    return {module for module, dists in packages_distributions().items()
            if not any(normalise(d) in allowed for d in dists) and module not in sys.stdlib_module_names}


def test_gpu_check_dry_run_answers_every_row_with_the_device_images_packages(tmp_path):
    site, log = tmp_path / "site", tmp_path / "imports"
    site.mkdir()
    log.mkdir()
    blocked = blocked_modules()
    assert "trl" in blocked and "torch" not in blocked  # the lists are read
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=sorted(blocked), log=str(log)))
    env = {**os.environ, "WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"), "PYTHONPATH": str(site),
           "PYTHON": sys.executable, "PEFTLAB_DATA_DIR": str(SHARED_DATA), "BUDGET": "1500"}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True,
                          timeout=1800, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    answers = json.loads((tmp_path / "out" / "answers.json").read_text())
    assert [r["row"] for r in answers["q1"]] == ["full-bf16-mixed", "lora-bf16-mixed", "lora-bf16-true",
                                                  "qlora-bf16-mixed"]
    assert all(r["finished"] and r["checks"]["weights changed"] for r in answers["q1"])
    q2 = {r["row"] for r in answers["q2"] if r["finished"] and "measured_gb" in r}
    assert q2 == {f"{shape}-{m}" for shape in ("llama-2-7b", "mistral-7b") for m in ("lora", "qlora", "full")}
    assert set(answers["q2_full_plans"]) == {"llama-2-7b", "mistral-7b"}
    assert "seed claimed" in answers["q2_full_plans"]["llama-2-7b"]
    assert set(answers["q3"]["rows"]) == {"peftlab-lora-bf16", "hf-trainer-lora-bf16"}
    assert answers["q3"]["gemm_gflops_measured"]["bfloat16"] > 0
    assert answers["fsdp"]["finished"]
    assert (tmp_path / "out" / "logs.tgz").is_file() and (tmp_path / "out" / "answers.md").is_file()
    imported = set().union(*(set(p.read_text().split()) for p in log.iterdir()))
    assert "torch" in imported and "peftlab" in imported and not imported & blocked


def test_prepare_carries_its_list_within_the_travel_limit(tmp_path):
    carry = tmp_path / "carry"
    env = {**os.environ, "GPU_CARRY": str(carry), "PEFTLAB_DATA_DIR": str(SHARED_DATA)}
    proc = subprocess.run(["bash", str(SCRIPT), "prepare"], env=env, capture_output=True, text=True, timeout=900,
                          cwd=REPO)
    if proc.returncode == 3:
        pytest.skip("the package registry is not reachable: " + proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = {normalise(p.name.split("-")[0]) for p in (carry / "wheels").glob("*.whl")}
    assert wheels | {"bitsandbytes"} == package_list("gpu_carry_packages.txt")
    assert all("cp312" in p.name or "py3" in p.name for p in (carry / "wheels").glob("*.whl"))
    assert (carry / "site" / "bitsandbytes").is_dir()
    assert (carry / "tokenizer" / "tokenizer.json").is_file() and (carry / "model" / "config.json").is_file()
    assert (carry / "datasets" / "wikitext-2-raw-v1" / "validation.txt").is_file()
    size = sum(p.stat().st_size for p in Path(carry).rglob("*") if p.is_file())
    assert size < 56 * 2**20, f"{size / 2**20:.1f} MiB: the repository and the carry must fit 64 MiB together"
