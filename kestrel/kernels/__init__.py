"""Kestrel's C++ CPU kernels (cpu_kernels.cpp, int4_tiles.cpp), compiled on this machine for this CPU on first use.

The set-up builds them (`python -m kestrel.kernels`); an engine loads the build from the cache. Where no
compiler is available the engine runs the same model on PyTorch ops alone (slower, same results), and says so.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from types import ModuleType
from typing import Optional

import torch

log = logging.getLogger("kestrel.kernels")
_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [os.path.join(_HERE, name) for name in ("cpu_kernels.cpp", "int4_tiles.cpp")]
HEADERS = [os.path.join(_HERE, "int4_tiles.h")]
# -march: this CPU's (KESTREL_KERNELS_MARCH=haswell builds the AVX2-only code, to test it on an AVX-512 machine)
MARCH = os.environ.get("KESTREL_KERNELS_MARCH", "native")
FLAGS = ["-O3", f"-march={MARCH}", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]  # errno-free exp vectorizes
_lock = threading.Lock()
_loaded: dict[str, Optional[ModuleType]] = {}
_error: Optional[str] = None


def _cpu_key() -> str:
    """What the machine code depends on: the CPU's feature flags (built with -march=native)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    return flags


def build_dir() -> str:
    src = b""
    for name in SOURCES + HEADERS:
        with open(name, "rb") as f:
            src += f.read()
    key = hashlib.sha256(src + torch.__version__.encode() + " ".join(FLAGS).encode() + _cpu_key().encode())
    root = os.environ.get("KESTREL_KERNELS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kestrel", "kernels"))
    return os.path.join(root, key.hexdigest()[:16])


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the pip-installed one sits in this environment's bin, which is not on PATH
    when the environment's python is run directly (as ./run and ./test do)."""
    import shutil

    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def load(verbose: bool = False) -> Optional[ModuleType]:
    """The compiled kernels (building them the first time, ~1 min), or None if they cannot be built here
    (`error()` says why)."""
    global _error
    with _lock:
        if "cpu" in _loaded:
            return _loaded["cpu"]
        module = None
        try:
            from torch.utils.cpp_extension import load as load_extension

            _put_ninja_on_path()
            path = build_dir()
            os.makedirs(path, exist_ok=True)
            module = load_extension(name="kestrel_cpu_kernels", sources=SOURCES, extra_cflags=FLAGS,
                                    extra_ldflags=["-fopenmp"], build_directory=path, verbose=verbose)
        except Exception as e:  # no compiler, no ninja, a build error: run on PyTorch ops instead
            _error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            log.warning("Kestrel's C++ CPU kernels are unavailable (%s); running on PyTorch ops alone", _error)
        _loaded["cpu"] = module
        return module


def error() -> Optional[str]:
    return _error


MAX_HEAD_DIM = 256  # the attention kernel's limit; head sizes must also be multiples of 16 (its vector width)


def resolve(requested: str, device: torch.device, dtype: torch.dtype,
            head_dim: int) -> tuple[Optional[ModuleType], str]:
    """The kernels an engine runs with for `requested` (auto | cpp | torch, validated by EngineConfig) on
    `device` in `dtype` for a model with heads of `head_dim`, and why."""
    if requested == "torch":
        return None, "PyTorch ops, as requested"
    if head_dim % 16 or head_dim > MAX_HEAD_DIM:
        if requested == "cpp":
            raise ValueError(f"the C++ kernels take head sizes that are multiples of 16 up to {MAX_HEAD_DIM}, "
                             f"not {head_dim}; use kernels='torch' or 'auto'")
        return None, f"PyTorch ops (head size {head_dim}: the C++ kernels take multiples of 16 up to {MAX_HEAD_DIM})"
    if device.type != "cpu":
        if requested == "cpp":
            raise ValueError(f"the C++ kernels are CPU kernels; use kernels='torch' or 'auto' on {device}")
        return None, f"PyTorch ops on {device}"
    if dtype not in (torch.float32, torch.bfloat16):
        if requested == "cpp":
            raise ValueError(f"the C++ kernels take float32 and bfloat16, not {dtype}")
        return None, f"PyTorch ops ({dtype})"
    module = load()
    if module is None:
        if requested == "cpp":
            raise RuntimeError(f"kernels='cpp' was asked for, but they could not be built: {_error}")
        return None, f"PyTorch ops (the C++ kernels could not be built: {_error})"
    return module, "C++ CPU kernels"
