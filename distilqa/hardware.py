"""What the machine at hand can do: CPU instruction sets, native bfloat16, the dtype and the device to use.

Machines differ from one session to the next (Intel Xeons with AMX, AMD EPYCs with AVX512-BF16,
AVX2-only machines where bfloat16 is emulated and slower than float32), so nothing is assumed:
the flags are read from the operating system and ``dtype="auto"`` follows them.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

# The ISA flags that decide which kernels are fast, as /proc/cpuinfo spells them.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # what help texts offer; DTYPES accepts short names too


@functools.cache
def cpu_info() -> dict[str, object]:
    """The CPU's model name and which of :data:`ISA_FLAGS` it has (Linux; elsewhere the flags are empty)."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                model = value.strip()
            elif name.strip() == "flags":
                flags = set(value.split())
                break
    return {
        "model": model,
        "isa": {flag: flag in flags for flag in ISA_FLAGS},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def median_seconds(functions: dict[str, Callable[[], object]], rounds: int = 5) -> dict[str, float]:
    """Each function's median wall time over ``rounds`` calls, the functions taking turns (a busy moment
    of the machine slows each alike, so the comparison holds where separate runs of each would not),
    after one round that sets up and is not counted. For choosing between implementations here."""
    seconds: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds + 1):
        for name, function in functions.items():
            began = time.perf_counter()
            function()
            seconds[name].append(time.perf_counter() - began)
    return {name: statistics.median(times[1:]) for name, times in seconds.items()}


# glibc hands a freed block larger than its mmap threshold (128 KiB at first, raised as large blocks are
# freed) back to the operating system, and trims the top of its heap beyond the trim threshold; the next
# forward pass then maps that memory anew and the kernel zeroes it page by page. Measured on an AMD EPYC
# (Zen 5): about 25,000 page faults per float32 forward at 8 x 384 and 14,000 per packed row of 2,000
# tokens, against under 2,000 with the memory kept; 2-7% of the time of a forward.
KEEP_MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MiB come from the heap and go back to it
KEEP_TRIM_THRESHOLD = 1 << 30  # up to 1 GiB free at the heap's top stays with the process


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep the memory a forward pass frees for the next one, instead of handing it back to the
    operating system to be mapped and zeroed again (``mallopt``; the reuse that CPU tuning guides seek by
    preloading jemalloc or tcmalloc). Process-wide and for the rest of the process: its memory stays near its peak. The
    ``QuestionAnswerer`` calls it on the CPU. Left alone where the C library is not glibc, or where glibc's
    own settings are in the environment (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
    ``glibc.malloc`` tunables): the user's choice stands. Returns whether it applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(
        libc.mallopt(m_mmap_threshold, KEEP_MMAP_THRESHOLD) and libc.mallopt(m_trim_threshold, KEEP_TRIM_THRESHOLD)
    )


def has_native_bfloat16(device: torch.device | str = "cpu") -> bool:
    """Whether matrix products in bfloat16 run natively: a CPU with AVX512-BF16 or AMX-BF16, or a CUDA
    GPU of compute capability 8.0 (Ampere) or newer."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        isa = cpu_info()["isa"]
        return bool(isa["avx512_bf16"] or isa["amx_bf16"])
    return False


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype:
    """A torch dtype for ``dtype``: None means float32 (the exact mode, whose answers match the
    reference); ``"auto"`` means bfloat16 where the hardware multiplies it natively, else float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPE_CHOICES)}")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if has_native_bfloat16(device) else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_CHOICES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The long name of a supported dtype: "float32", "bfloat16" or "float16"."""
    return str(resolve_dtype(dtype)).removeprefix("torch.")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A torch device this torch can run on, for ``device`` (None means the CPU); a ValueError that
    says what to use instead for a name torch does not know ("nonsense"), a backend this build or
    machine lacks ("cuda" on a CPU-only torch) or a device index beyond the ones present."""
    if device is None:
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or another torch device type") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "meta":
        raise ValueError(f"device {device!r} holds no data and cannot run a model; use cpu or cuda")
    backend = getattr(torch, resolved.type, None)
    if backend is None or not callable(getattr(backend, "is_available", None)) or not backend.is_available():
        if resolved.type == "cuda" and not torch.backends.cuda.is_built():
            why = f"this torch ({torch.__version__}) was built without CUDA"
        else:
            why = f"torch {torch.__version__} finds no {resolved.type} device on this machine"
        raise ValueError(f"device {device!r} is not available: {why}; use the cpu instead")
    count = getattr(backend, "device_count", None)
    if resolved.index is not None and callable(count) and resolved.index >= count():
        raise ValueError(f"device {device!r} does not exist: this machine has {count()} {resolved.type} device(s)")
    return resolved
