"""Precision detection and resolution: pure functions, tested for CPUs with and without native bf16."""

from __future__ import annotations

import pytest

from peftlab.errors import UserError
from peftlab.precision import Capabilities, detect, from_dtype, parse_cpu_flags, resolve

ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
ICELAKE = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: avx512f amx_tile amx_bf16 amx_int8\n"


def test_cpu_flags_are_parsed_from_cpuinfo():
    assert "avx512_bf16" in parse_cpu_flags(ZEN4)
    assert "avx512_bf16" not in parse_cpu_flags(ICELAKE)
    assert parse_cpu_flags("no flags here") == frozenset()


@pytest.mark.parametrize(("cpuinfo", "name", "reason"), [
    (ZEN4, "bf16-mixed", "auto: CPU has avx512_bf16"),
    (SAPPHIRE, "bf16-mixed", "auto: CPU has amx_bf16"),
    (ICELAKE, "fp32", "auto: CPU has no native bf16"),
])
def test_auto_picks_bf16_mixed_only_with_native_bf16(cpuinfo, name, reason):
    chosen = resolve("auto", Capabilities("cpu", parse_cpu_flags(cpuinfo)))
    assert (chosen.name, chosen.reason, chosen.emulated) == (name, reason, False)


def test_explicit_bf16_on_a_cpu_without_it_works_but_warns():
    chosen = resolve("bf16-mixed", Capabilities("cpu", parse_cpu_flags(ICELAKE)))
    assert chosen.name == "bf16-mixed" and chosen.emulated
    assert "emulated" in chosen.warning() and "\n" not in chosen.warning()
    native = resolve("bf16-true", Capabilities("cpu", parse_cpu_flags(ZEN4)))
    assert not native.emulated and native.warning() is None


def test_cuda_resolution():
    assert resolve("auto", Capabilities("cuda", cuda_bf16=True, cuda_name="H200")).name == "bf16-mixed"
    assert resolve("auto", Capabilities("cuda", cuda_bf16=False)).name == "fp32"
    with pytest.raises(UserError, match="does not support bf16"):
        resolve("bf16-mixed", Capabilities("cuda", cuda_bf16=False))


def test_bad_precision_and_dtype_alias():
    with pytest.raises(UserError, match=r"precision 'bf16'.*fp32, bf16-mixed"):
        resolve("bf16", Capabilities("cpu"))
    assert from_dtype("float32") == "fp32" and from_dtype("bfloat16") == "bf16-true" and from_dtype("auto") == "auto"
    with pytest.raises(UserError, match="--precision"):
        from_dtype("int8")


def test_detect_reads_a_cpuinfo_file(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(ZEN4)
    assert detect("cpu", path).native_bf16 == "CPU has avx512_bf16"
    assert detect("cpu", tmp_path / "missing").native_bf16 is None


def test_cpu_model_name_is_read_from_cpuinfo(tmp_path):
    from peftlab.precision import cpu_model_name

    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14 96-Core Processor\nflags\t: avx512_bf16\n")
    assert cpu_model_name(path) == "AMD EPYC 9R14 96-Core Processor"
    assert cpu_model_name(tmp_path / "missing") is None


def test_planner_resolves_auto_and_takes_explicit_precisions():
    from peftlab.configure import load_config
    from peftlab.plan.memory import plan_input_from_config

    # conftest: in-process `auto` resolves as on a CPU without native bf16
    assert plan_input_from_config(load_config(None, {"device": "cpu"})).precision == "fp32"
    assert plan_input_from_config(load_config(None, {"device": "cpu", "precision": "bf16-mixed"})).precision == \
        "bf16-mixed"
