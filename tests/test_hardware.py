"""dtype="auto" follows the CPU's native bf16 support; the thread count follows the cores the process may use."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kestrel.engine import hardware


def _caps(**flags):
    base = {"amx_bf16": False, "avx512_bf16": False, "avx2": True}
    return lambda: dict(base, **flags)


@pytest.mark.parametrize("flags, expected", [
    (dict(), torch.float32),                      # AVX2 only (e.g. older AMD EPYC)
    (dict(avx512_bf16=True), torch.bfloat16),     # AVX512-BF16 (e.g. AMD Zen 4)
    (dict(amx_bf16=True), torch.bfloat16),        # AMX (Sapphire Rapids and later)
])
def test_auto_dtype_follows_native_bf16(monkeypatch, flags, expected):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", _caps(**flags))
    dtype, reason = hardware.resolve_dtype("auto", torch.device("cpu"))
    assert dtype == expected and reason.startswith("auto")
    # an explicit choice always wins
    assert hardware.resolve_dtype("bfloat16", torch.device("cpu"))[0] == torch.bfloat16
    assert hardware.resolve_dtype("float32", torch.device("cpu"))[0] == torch.float32


def test_onednn_isa_cap_counts_as_no_bf16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", _caps(avx512_bf16=True, amx_bf16=True))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert hardware.resolve_dtype("auto", torch.device("cpu"))[0] == torch.float32


def test_threads_follow_affinity_and_cgroup_quota(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(hardware, "_cgroup_cpu_quota", lambda: None)
    assert hardware.usable_cpus() == 8
    monkeypatch.setattr(hardware, "_cgroup_cpu_quota", lambda: 2.5)  # cpu.max "250000 100000"
    assert hardware.usable_cpus() == 3
    assert hardware.resolve_threads(None)[0] == 3
    assert hardware.resolve_threads(5) == (5, "as requested")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert hardware.resolve_threads(None)[0] == 1


def test_engine_applies_the_thread_count_to_torch():
    """In a fresh process pinned to one core, the engine's placement uses one thread."""
    code = ("import os, torch; os.sched_setaffinity(0, {0}); from kestrel.engine.hardware import place; "
            "p = place('cpu', 'auto', None); print(p.threads, torch.get_num_threads()); print(p.describe())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    first, described = out.stdout.splitlines()[:2]
    assert first == "1 1"
    assert "dtype" in described and "1 CPU threads" in described
