"""`d2lft bench` keeps working: a few real steps of each contender on the embedded dataset."""
from __future__ import annotations

import json

import pytest

from d2lft.bench import TimedLoader, bench, format_report, format_time_to_accuracy, time_to_accuracy
from d2lft.cli import main
from d2lft.errors import ConfigError
from d2lft.synthetic import make_shapes


def test_timed_loader_counts_steps_between_batches():
    timed = TimedLoader([([0, 0], [0, 0])] * 5, limit=4)
    assert len(list(timed)) == 4
    assert len(timed.step_seconds()) == 3
    assert all(s >= 0 for s in timed.step_seconds())
    assert len(list(TimedLoader([([0], [0])] * 2, limit=5))) == 5  # into a third epoch
    with pytest.raises(ConfigError, match="yielded no batches"):
        list(TimedLoader([], limit=3))


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


def test_bench_reads_a_small_folder_for_more_than_one_epoch_to_time_every_step_asked_for(tmp_path):
    root = make_shapes(tmp_path)  # 120 training images: 3 batches of 32
    report = bench(model="efficientnet_lite0", image_size=32, batch_size=32, steps=7, warmup=1, device="cpu",
                   data=root, contenders=("plain", "fit"))
    assert report["timed_steps"] == {"plain": 7, "fit": 7}
    for name, spread in report["images_per_second_spread"].items():
        assert spread["min"] <= spread["median"] == report["images_per_second"][name] <= spread["max"]
    assert "median step of 7" in format_report(report)


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


def test_time_to_accuracy_stops_the_tutorial_at_the_first_epoch_that_reaches_the_target(tmp_path):
    root = make_shapes(tmp_path)
    report = time_to_accuracy(0.01, data=root, image_size=32, batch_size=8, max_epochs=3, device="cpu",
                              contenders=("tutorial",))
    tutorial = report["contenders"]["tutorial"]
    assert tutorial["reached"] and tutorial["epochs"] == 1 and len(tutorial["curve"]) == 1
    assert 0 < tutorial["seconds"] and tutorial["val_acc"] >= 0.01
    assert "speedup" not in report  # one contender: nothing to compare
    # a target no run reaches: every epoch runs, each row later than the one before
    report = time_to_accuracy(1.0, data=root, image_size=32, batch_size=8, max_epochs=2, device="cpu",
                              contenders=("tutorial",))
    curve = report["contenders"]["tutorial"]["curve"]
    assert [row["epoch"] for row in curve] == [1, 2] and curve[0]["seconds"] < curve[1]["seconds"]
    assert report["contenders"]["tutorial"]["reached"] is (curve[-1]["val_acc"] >= 1.0)
    assert "did not reach it in 2 epochs" in format_time_to_accuracy(report) or curve[-1]["val_acc"] >= 1.0


@pytest.mark.slow
def test_bench_to_accuracy_cli_runs_both_contenders_and_writes_json(tiny_folder, tmp_path):
    out = tmp_path / "tta.json"
    assert main(["bench", "--to-accuracy", "0.01", "--data", str(tiny_folder), "--image-size", "32",
                 "--max-epochs", "1", "--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["contenders"]) == {"tutorial", "default"}
    assert all(r["reached"] for r in report["contenders"].values())
    assert report["speedup"] == pytest.approx(report["contenders"]["tutorial"]["seconds"]
                                              / report["contenders"]["default"]["seconds"])


def test_bench_to_accuracy_refuses_a_target_above_one(tmp_path, capsys):
    assert main(["bench", "--to-accuracy", "1.5", "--data", str(tmp_path)]) == 1
    assert "--to-accuracy 1.5" in capsys.readouterr().err
