"""keep_freed_memory: after it, freeing and re-allocating a large buffer no longer faults its pages in again.
bf16_evaluation: inside the block the CPU's evaluation passes run in bfloat16, training does not, and
everything is float32 again after it."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import make_image_folder
from nets import staged_net

from d2lft import device as device_module
from d2lft.data import image_folders
from d2lft.device import bf16_evaluation, evaluates_in_bf16
from d2lft.features import domain_shift, extract_features
from d2lft.train import fit, predict

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


@pytest.fixture
def folders(tmp_path):
    """An ImageFolderData of 3 classes x 6 images at 16 px."""
    root = make_image_folder(tmp_path / "f", classes=("a", "b", "c"), per_class=6, size=20)
    return image_folders(root, staged_net(), image_size=16, batch_size=4, progress=False)


def _run(net, data) -> dict:
    """What the block changes: features, predictions, the domain-shift figure, and a short fit."""
    out = {"features": extract_features(net, data.val, progress=False).tensors[0],
           "probs": predict(net, data.val)[0], "shift": domain_shift(net, data, images=12)}
    history = fit(staged_net(), data.train, data.val, epochs=2, lr=1e-2, progress=False, seed=0, best=None)
    out["train_loss"], out["val_loss"] = history.train_loss, history.val_loss
    return out


@pytest.mark.skipif(not device_module.native_bf16(), reason="this CPU has no bfloat16 instructions (AVX512-BF16 or AMX)")
def test_bf16_evaluation_runs_evaluation_in_bfloat16_and_training_in_float32_inside_the_block_only(folders):
    net = staged_net().eval()
    before = _run(net, folders)
    with bf16_evaluation() as on:
        assert on and evaluates_in_bf16()
        inside = _run(net, folders)
    assert not evaluates_in_bf16()
    after = _run(net, folders)
    for key in ("features", "probs"):
        assert torch.equal(before[key], after[key]), key  # float32 again after the block
        assert before[key].dtype == inside[key].dtype == torch.float32, key  # bfloat16 stays inside
        difference = (before[key] - inside[key]).abs().max().item()
        assert 0 < difference < 0.05 * before[key].abs().max().item(), (key, difference)  # rounded, not wrong
    assert inside["shift"] == before["shift"]  # compared with a threshold: float32 even inside
    assert inside["train_loss"] == before["train_loss"]  # training steps stay in float32
    assert inside["val_loss"] != before["val_loss"]  # fit's validation ran in bfloat16
    assert inside["val_loss"] == pytest.approx(before["val_loss"], rel=0.02)


def test_bf16_evaluation_changes_nothing_where_the_cpu_lacks_bfloat16_or_when_off(monkeypatch, folders):
    net = staged_net().eval()
    loader = folders.val
    reference = predict(net, loader)[0]
    with bf16_evaluation(False) as on:
        assert not on and torch.equal(predict(net, loader)[0], reference)
    monkeypatch.setattr(device_module, "native_bf16", lambda: False)
    with bf16_evaluation() as on:
        assert not on and torch.equal(predict(net, loader)[0], reference)


def test_bf16_evaluation_ends_with_its_block_even_on_an_error():
    with pytest.raises(KeyboardInterrupt):
        with bf16_evaluation():
            raise KeyboardInterrupt
    assert not evaluates_in_bf16()
