"""keep_freed_memory: after it, freeing and re-allocating a large buffer no longer faults its pages in again."""
from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from d2lft.device import keep_freed_memory
if sys.argv[1] == "on":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(16 << 20).fill_(1.0)  # 64 MiB, the size of a large activation buffer
before = faults()
for _ in range(30):
    torch.empty(16 << 20).fill_(1.0)
print(faults() - before)
"""


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    default, kept = page_faults("off"), page_faults("on")
    assert default > 25 * 16_000  # 30 x 64 MiB of 4 KiB pages, faulted in again every time
    assert kept < default / 10  # a few warm-up faults, then none
