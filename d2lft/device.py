"""Devices, seeds and the process-wide CPU settings: the things a run sets up before training.

* `get_device`: CUDA, else Apple's MPS, else the CPU (never None, unlike d2l's helper).
* `set_seed`: Python's, NumPy's and PyTorch's generators in one call.
* `keep_freed_memory`: an explicit, process-wide allocator setting for CPU training (see below);
  d2lft never changes it behind your back.
* `bf16_evaluation`: a block whose evaluation passes run in bfloat16 on a CPU that computes it
  natively (``d2lft finetune`` runs in one).

CPU tuning that PyTorch leaves to the user is how the C allocator treats a training step's
buffers.

A training step allocates and frees the same large activation and gradient buffers every step.
glibc's ``malloc`` hands buffers above its mmap threshold back to the kernel when they are freed,
and the next step faults the same pages in again: time spent in the kernel, not in PyTorch.
Measured on this project's 2-core machine (EfficientNet-Lite0, 224 px, batch 16, channels_last,
one process): 21.9 -> 24.3 images/s, system time 3.6 s -> 1.1 s for 14 steps. Intel's PyTorch
tuning guides get the same effect by swapping in jemalloc or tcmalloc; one ``mallopt`` call does it
without a new dependency.
"""
from __future__ import annotations

import contextlib
import ctypes
import random
import sys
from collections.abc import Iterator

import numpy as np
import torch

from d2lft.errors import ConfigError

__all__ = ["get_device", "set_seed", "keep_freed_memory", "bf16_evaluation"]


def get_device() -> torch.device:
    """The fastest device here: CUDA if available, else Apple's MPS, else the CPU (never None).

    >>> get_device().type in ("cuda", "mps", "cpu")
    True
    """
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` as a torch.device that exists here (None: `get_device()`); one clear error otherwise."""
    if device is None:
        return get_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r} is not a device name; use cpu, cuda or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise ConfigError(f"device={str(device)!r} is not available on this machine; use "
                          f"{' or '.join(k for k, ok in available.items() if ok)}")
    return device


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (CPU and CUDA) random number generators.

    >>> set_seed(0); a = torch.rand(2); set_seed(0)
    >>> torch.equal(a, torch.rand(2))
    True
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise ConfigError(f"seed={seed!r}: expected a whole number from 0 to 2**63 - 1")
    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    torch.manual_seed(int(seed))  # also seeds every CUDA device


_M_TRIM_THRESHOLD = -1  # from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Ask glibc's malloc to keep freed buffers below `threshold_bytes` for reuse; True if it applied.

    Process-wide, like ``torch.set_num_threads``: the process keeps its peak memory instead of
    returning it between steps. The ``d2lft`` command line calls it for CPU runs; call it yourself
    (once, at the start of a script or notebook) to give `d2lft.fit` or a hand-written loop the
    same speed. False (and nothing changed) where the C library is not glibc.

    >>> keep_freed_memory()  # doctest: +SKIP
    True
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    threshold = int(min(threshold_bytes, 2**31 - 1))
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))


_bf16_evaluation = False


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), which oneDNN uses."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return torch.backends.mkldnn.is_available() and any(getattr(torch.cpu, c, lambda: False)() for c in checks)


@contextlib.contextmanager
def bf16_evaluation(enabled: bool = True) -> Iterator[bool]:
    """Within the block, the CPU's evaluation passes run in bfloat16 where the CPU computes it natively.

    Every pass without gradients on the CPU (`evaluate`, `predict`, `extract_features`,
    `classify` and fit's validation) then runs under ``torch.autocast("cpu",
    dtype=torch.bfloat16)``; training steps stay in float32. On a 2-core EPYC with AVX512-BF16,
    Lite0's inference at 224 px ran 2.2x faster (93 -> 203 images/s, batch 32, BatchNorm folded,
    channels-last), while a training step did not gain (15.5 -> 14.5 images/s with BatchNorm
    frozen), so only evaluation changes. Outputs then agree with float32's to about 1e-2
    (bfloat16 keeps 8 bits of mantissa): enough for accuracy and for a linear probe's features,
    not for golden figures, so the library's default is float32 and ``d2lft finetune`` runs
    inside this block. The block yields whether it is on: False (nothing
    changes) on a CPU without bfloat16 instructions, where autocast would emulate it, slower.

    >>> with bf16_evaluation(False) as on:
    ...     on
    False
    """
    global _bf16_evaluation
    before = _bf16_evaluation
    _bf16_evaluation = bool(enabled) and native_bf16()
    try:
        yield _bf16_evaluation
    finally:
        _bf16_evaluation = before


def evaluates_in_bf16() -> bool:
    """Whether evaluation on the CPU runs in bfloat16 here and now (inside `bf16_evaluation`)."""
    return _bf16_evaluation
