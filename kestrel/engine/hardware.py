"""What this machine offers the engine: the dtype that is fast on it, and the cores this process may use.

bf16 matmuls are fast only where the CPU has native bf16 units (AMX tiles, or AVX512-BF16 dot
products); elsewhere PyTorch converts to float32 around every matmul and bf16 runs ~3x slower than
float32. So `dtype="auto"` picks bf16 on such CPUs and float32 on the others, and on CUDA bf16 where
the GPU supports it (float16 otherwise).

PyTorch sizes its thread pool from the machine's cores, which in a container can be many more than the
process may use (an affinity mask, or a cgroup CPU quota): oversubscribed threads spin and wait on each
other. `usable_cpus` reads both limits.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which its bf16 kernels cannot use native bf16 instructions
_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_bf16_units() -> list[str]:
    """The native bf16 matrix features of this CPU that oneDNN may use (empty if none)."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if cap in _ISAS_WITHOUT_BF16:
        return []
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # older PyTorch: read the kernel's flags instead
        caps = {f: True for f in _proc_cpu_flags()}
    return [f for f in ("amx_bf16", "avx512_bf16") if caps.get(f)]


def _proc_cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def usable_cpus() -> int:
    """Cores this process may run on: its affinity mask, capped by a cgroup CPU quota if one is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time the cgroup grants per period (v2 cpu.max, or v1 cfs quota), None if unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Placement:
    """Where and how the engine computes, and why (the server logs `describe()` at start)."""

    device: torch.device
    dtype: torch.dtype
    dtype_reason: str
    threads: int
    threads_reason: str

    def describe(self) -> str:
        name = str(self.dtype).replace("torch.", "")
        where = self.device.type if self.device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(self.device)})"
        return f"device {where}, dtype {name} ({self.dtype_reason}), {self.threads} CPU threads ({self.threads_reason})"


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was requested but PyTorch sees no CUDA GPU; use --device cpu")
    return device


def resolve_dtype(requested: str, device: torch.device) -> tuple[torch.dtype, str]:
    if requested != "auto":
        return DTYPES[requested], "as requested"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: the GPU supports bf16"
        return torch.float16, "auto: the GPU has no bf16"
    units = cpu_bf16_units()
    if units:
        return torch.bfloat16, f"auto: the CPU has native bf16 ({', '.join(units)})"
    return torch.float32, "auto: the CPU has no native bf16 (no AMX or AVX512-BF16), so float32 is faster"


def resolve_threads(requested: int | None) -> tuple[int, str]:
    if requested:
        return requested, "as requested"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"]), "from OMP_NUM_THREADS"
    return usable_cpus(), "the cores this process may use (affinity and cgroup quota)"


def place(device: str, dtype: str, threads: int | None) -> Placement:
    """Resolve the config's device, dtype and thread count, and apply the thread count to PyTorch."""
    dev = resolve_device(device)
    dt, dt_reason = resolve_dtype(dtype, dev)
    n, n_reason = resolve_threads(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return Placement(dev, dt, dt_reason, n, n_reason)
