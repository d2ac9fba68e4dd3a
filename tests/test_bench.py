"""`d2lft bench` keeps working: a few real steps of each contender on the embedded dataset."""
from __future__ import annotations

import json

import pytest

from d2lft.bench import TimedLoader, bench, format_report
from d2lft.cli import main
from d2lft.synthetic import make_shapes


def test_timed_loader_counts_steps_between_batches():
    timed = TimedLoader([([0, 0], [0, 0])] * 5, limit=4)
    assert len(list(timed)) == 4
    assert len(timed.step_seconds()) == 3
    assert all(s >= 0 for s in timed.step_seconds())


@pytest.mark.slow
def test_bench_runs_all_contenders_and_reports_ratios(tmp_path):
    root = make_shapes(tmp_path)
    report = bench(model="efficientnet_lite0", image_size=32, batch_size=8, steps=3, warmup=1, device="cpu",
                   data=root)
    assert set(report["images_per_second"]) == {"plain", "fit_plain", "fit"}
    assert all(v > 0 for v in report["images_per_second"].values())
    assert set(report["ratio_vs_plain"]) == {"fit_plain", "fit"}
    assert report["timed_steps"] == {"plain": 3, "fit_plain": 3, "fit": 3}
    # inference of the same model on batches of the same shape: a trained image costs more than one pass
    assert report["inference_images_per_second"] > 0
    assert set(report["forward_passes_per_trained_image"]) == {"plain", "fit_plain", "fit"}
    assert all(v > 1 for v in report["forward_passes_per_trained_image"].values()), report
    assert "plain" in format_report(report) and "forward passes" in format_report(report)


def test_bench_reports_fewer_steps_when_the_data_runs_out(tmp_path):
    root = make_shapes(tmp_path)  # 120 training images: 3 batches of 32
    report = bench(model="efficientnet_lite0", image_size=32, batch_size=32, steps=50, warmup=1, device="cpu",
                   data=root, contenders=("plain",))
    assert 0 < report["timed_steps"]["plain"] < 50
    assert "asked for 50" in format_report(report)


def test_bench_cli_writes_json(tmp_path):
    root = make_shapes(tmp_path)
    out = tmp_path / "bench.json"
    assert main(["bench", "--data", str(root), "--image-size", "32", "--batch-size", "8", "--steps", "2",
                 "--warmup", "1", "--device", "cpu", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["images_per_second"]["fit"] > 0


def test_bench_skips_what_finetune_skips_and_says_so(tmp_path):
    # Issue 11, defect 9: torchvision's default loader ended the plain contender with a traceback on a
    # 0-byte JPEG, and took a .ipynb_checkpoints folder for a class.
    from d2lft.data import BadImageWarning
    from d2lft.synthetic import CLASSES

    root = make_shapes(tmp_path)
    empty = root / "train" / CLASSES[0] / "empty.jpg"
    empty.write_bytes(b"")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / CLASSES[1] / ".ipynb_checkpoints").mkdir()
    (root / "train" / CLASSES[1] / ".ipynb_checkpoints" / "0-checkpoint.png").write_bytes(b"")
    with pytest.warns(BadImageWarning, match="empty.jpg"):
        report = bench(model="efficientnet_lite0", image_size=32, batch_size=8, steps=2, warmup=1, device="cpu",
                       data=root, contenders=("plain", "fit_plain"))
    assert report["skipped"] == [str(empty)]
    assert report["images_per_second"]["plain"] > 0 and report["images_per_second"]["fit_plain"] > 0
    assert "skipped 1 file(s)" in format_report(report)
