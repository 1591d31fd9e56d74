"""distilqa.hardware: which dtype "auto" means on the machine at hand, decided from the CPU's flags; how
choices between implementations are timed; glibc keeping freed memory for the next forward pass."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from distilqa import hardware


def with_flags(monkeypatch, **present: bool) -> None:
    isa = {flag: present.get(flag, False) for flag in hardware.ISA_FLAGS}
    monkeypatch.setattr(hardware, "cpu_info", lambda: {"model": "test CPU", "isa": isa, "torch_cpu_capability": "x"})


@pytest.mark.parametrize(
    "flags, native",
    [
        ({"avx2": True}, False),  # AVX2 only: bfloat16 is emulated, slower than float32
        ({"avx2": True, "avx512f": True}, False),
        ({"avx512f": True, "avx512_bf16": True}, True),  # AMD Zen 4/5, Intel Cooper Lake+
        ({"amx_bf16": True, "amx_tile": True}, True),  # Intel Sapphire Rapids+
    ],
)
def test_auto_follows_the_cpu_flags(monkeypatch, flags, native):
    with_flags(monkeypatch, **flags)
    assert hardware.has_native_bfloat16("cpu") is native
    assert hardware.resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)


def test_explicit_dtypes_and_the_exact_default():
    assert hardware.resolve_dtype(None) == torch.float32  # the default mode matches the reference
    for name, dtype in [("float32", torch.float32), ("bf16", torch.bfloat16), ("float16", torch.float16)]:
        assert hardware.resolve_dtype(name) == dtype
    assert hardware.resolve_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        hardware.resolve_dtype("float8")
    with pytest.raises(ValueError, match="not supported"):
        hardware.resolve_dtype(torch.int8)


def test_this_machine_is_described():
    info = hardware.cpu_info()
    assert info["model"] and set(info["isa"]) == set(hardware.ISA_FLAGS)
    if "avx512_bf16" in open("/proc/cpuinfo").read():  # noqa: SIM115 (one read)
        assert hardware.has_native_bfloat16("cpu")


def test_devices_this_torch_cannot_use_are_refused_with_advice():
    assert hardware.resolve_device(None) == torch.device("cpu")
    assert hardware.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'nonsense'; use cpu, cuda"):
        hardware.resolve_device("nonsense")
    with pytest.raises(ValueError, match="holds no data"):
        hardware.resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda:0' is not available: .*; use the cpu instead"):
            hardware.resolve_device("cuda:0")
    else:
        with pytest.raises(ValueError, match="does not exist"):
            hardware.resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_one_table_of_dtype_names():
    assert hardware.dtype_name(hardware.resolve_dtype("bf16")) == "bfloat16"
    assert {hardware.dtype_name(dtype) for dtype in hardware.DTYPES.values()} == {"float32", "bfloat16", "float16"}


def test_median_seconds_takes_turns_and_skips_the_setup_round(monkeypatch):
    """The functions run in turns, round after round; each one's first call (setup) is not counted and
    the median of the rest is: a one-off slow call (the machine busy for a moment) moves nothing."""
    clock, calls = [0.0], []
    monkeypatch.setattr(hardware.time, "perf_counter", lambda: clock[0])
    costs = {"a": [9.0, 1.0, 1.0, 7.0], "b": [9.0, 2.0, 8.0, 2.0]}

    def costing(name):
        def run():
            calls.append(name)
            clock[0] += costs[name][sum(c == name for c in calls) - 1]

        return run

    assert hardware.median_seconds({name: costing(name) for name in costs}, rounds=3) == {"a": 1.0, "b": 2.0}
    assert calls == ["a", "b"] * 4


# Blocks of the sizes of a forward pass's activations, each written and freed, twice over: the page faults
# of the second pass (the first one maps the memory).
FREED_MEMORY_PROGRAM = """
import ctypes, resource, sys
from distilqa import hardware
applied = hardware.keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for mib in (8, 12, 16, 20, 24, 28):
        block = libc.malloc(mib << 20)
        ctypes.memset(block, 1, mib << 20)
        libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(applied, faults())
"""


def page_faults_of_freed_memory_program(mode: str, **environment: str) -> tuple[str, int]:
    run = subprocess.run(
        [sys.executable, "-c", FREED_MEMORY_PROGRAM, mode], capture_output=True, text=True, check=True,
        env={**os.environ, **environment},
    )  # fmt: skip
    applied, faults = run.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory tunes glibc's malloc")
def test_keep_freed_memory_stops_the_page_faults_of_each_pass():
    """glibc left alone maps blocks above its (moving) threshold anew each time and the kernel zeroes them
    (7,165 page faults measured for this program's second pass: its 28 MiB); kept, the freed blocks are
    reused (0 measured). Where glibc's own settings are in the environment they stand: nothing changes."""
    applied, faults = page_faults_of_freed_memory_program("keep")
    _, faults_left_alone = page_faults_of_freed_memory_program("default")
    assert applied == "True" and faults < 100 and faults_left_alone > 5000
    applied, faults = page_faults_of_freed_memory_program("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False" and faults > 5000
