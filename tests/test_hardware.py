"""distilqa.hardware: which dtype "auto" means on the machine at hand, decided from the CPU's flags."""

from __future__ import annotations

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
