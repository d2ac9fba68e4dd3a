"""The one-call recipe: what each strategy trains, and what a halted run keeps."""
from __future__ import annotations

import json

import pytest
import torch

import d2lft.cli as cli
import d2lft.recipes as recipes
from d2lft import book
from d2lft.cli import main, run_finetune
from d2lft.data import image_folders
from d2lft.models import create_model
from d2lft.recipes import fine_tune
from d2lft.train import History

QUIET = {"device": "cpu", "progress": False}


def lite0_and_data(root):
    net = create_model("efficientnet_lite0", num_classes=2)
    data = image_folders(root, net, image_size=32, batch_size=4, progress=False)
    return net, data


def backbone_copy(net):
    return {k: v.clone() for k, v in net.backbone.state_dict().items()}


def changed(before, net) -> bool:
    return any(not torch.equal(before[k], v) for k, v in net.backbone.state_dict().items())


def test_probe_trains_the_head_only_and_finetune_trains_everything(tiny_folder):
    net, data = lite0_and_data(tiny_folder)
    before, head = backbone_copy(net), net.head.weight.clone()
    history = fine_tune(net, data, strategy="probe", epochs=2, **QUIET)
    assert len(history) == 2 and not changed(before, net)
    assert not torch.equal(head, net.head.weight)
    assert all(p.requires_grad for p in net.parameters())  # handed back unfrozen

    history = fine_tune(net, data, strategy="finetune", epochs=1, **QUIET)
    assert len(history) == 1 and changed(before, net)


def test_lp_ft_history_holds_both_phases(tiny_folder):
    net, data = lite0_and_data(tiny_folder)
    history = fine_tune(net, data, strategy="lp-ft", epochs=1, probe_epochs=2, **QUIET)
    assert history.epoch == [1, 2, 3]


def test_settings_are_checked_before_training(tiny_folder):
    net, data = lite0_and_data(tiny_folder)
    with pytest.raises(ValueError, match="strategy='linear'"):
        fine_tune(net, data, strategy="linear", **QUIET)
    with pytest.raises(ValueError, match="head has 5 outputs but the data needs 2"):
        fine_tune(create_model("efficientnet_lite0", num_classes=5), data, **QUIET)


@pytest.mark.parametrize("reason", ["interrupted", "non-finite"])
def test_lp_ft_stops_after_a_halted_probe(tiny_folder, monkeypatch, reason):
    halted = History(epoch=[1], train_loss=[0.7], val_acc=[0.5],
                     stop_reason="interrupted" if reason == "interrupted" else "non_finite_loss")
    monkeypatch.setattr(recipes, "probe", lambda *a, **k: halted)
    monkeypatch.setattr(recipes, "fit", lambda *a, **k: pytest.fail("fine-tuned after a halted probe"))
    net, data = lite0_and_data(tiny_folder)
    assert fine_tune(net, data, strategy="lp-ft", epochs=1, **QUIET) is halted


def test_a_run_interrupted_before_its_first_epoch_still_reports(tiny_folder, monkeypatch, tmp_path):
    halted = History(stop_reason="interrupted", stop_message="interrupted (Ctrl-C) during epoch 1")
    monkeypatch.setattr(recipes, "fine_tune", lambda *a, **k: halted)
    report = run_finetune(tiny_folder, image_size=32, progress=False, checkpoint=tmp_path / "best.pt")
    assert report["val_acc"] is None and report["epochs"] == 0 and report["interrupted"]
    assert (tmp_path / "best.pt").exists()  # the weights are kept


def test_cli_ctrl_c_during_training_keeps_the_json_and_exits_130(tiny_folder, monkeypatch, tmp_path, capsys):
    halted = History(epoch=[1], train_loss=[0.7], val_acc=[0.75], stop_reason="interrupted",
                     stop_message="interrupted (Ctrl-C) during epoch 2")
    monkeypatch.setattr(recipes, "fine_tune", lambda *a, **k: halted)
    out = tmp_path / "out.json"
    assert main(["finetune", str(tiny_folder), "--image-size", "32", "--json", str(out)]) == 130
    report = json.loads(out.read_text())  # the history's figures, and those of the model handed back on val/
    matrix = report["confusion_matrix"]
    assert report["best_val_acc"] == 0.75 and report["val_acc"] == (matrix[0][0] + matrix[1][1]) / 8
    assert f"stopped: interrupted (Ctrl-C) during epoch 2; kept {out}" in capsys.readouterr().err


def test_cli_ctrl_c_outside_training_is_one_line(tiny_folder, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("d2lft.data.image_folders", interrupted)
    assert main(["finetune", str(tiny_folder)]) == 130
    assert capsys.readouterr().err.strip() == "d2lft finetune: interrupted"


def test_course_settings_are_small_on_a_cpu():
    settings = book.settings("cpu")
    assert (settings.image_size, settings.batch_size, settings.epochs_scale) == (128, 32, 1)


def test_fit_options_pass_through_and_settings_that_do_nothing_are_refused(tiny_folder, tmp_path):
    net, data = lite0_and_data(tiny_folder)
    history = fine_tune(net, data, strategy="finetune", epochs=2, best=None, early_stopping=None,
                        checkpoint=tmp_path / "run.pt", **QUIET)
    assert len(history) == 2 and (tmp_path / "run.pt").is_file()
    with pytest.raises(ValueError, match="lr=1e-06 is the backbone's learning rate.*probe_lr"):
        fine_tune(net, data, strategy="probe", lr=1e-6, **QUIET)
    with pytest.raises(ValueError, match="lr=nan"):
        fine_tune(net, data, strategy="finetune", lr=float("nan"), **QUIET)
    with pytest.raises(ValueError, match="task= is fine_tune's own option"):
        fine_tune(net, data, strategy="finetune", task="regression", **QUIET)


@pytest.mark.parametrize("lr", [1e-4, 3.0])
def test_lp_ft_never_ends_below_its_own_probe(tiny_folder, lr):
    from d2lft.train import evaluate

    net, data = lite0_and_data(tiny_folder)
    history = fine_tune(net, data, strategy="lp-ft", epochs=2, probe_epochs=5, lr=lr, label_smoothing=0, **QUIET)
    probe_best = min(history.val_loss[:history.probe_epochs])
    final = evaluate(net, data.val)["loss"]
    assert final <= probe_best + 1e-5, (history.kept, final, probe_best)
    assert history.kept in ("probe", "finetune") and history.probe_epochs == 5
    if lr == 3.0:  # an absurd rate wrecks the fine-tuning phase: the probed model comes back
        assert history.kept == "probe" and final == pytest.approx(probe_best, abs=1e-5)


def test_lp_ft_starts_from_the_probed_head_without_a_head_multiplier(tiny_folder, monkeypatch):
    seen = {}
    real_fit = recipes.fit

    def spy(net, train, val, *, optimizer, **kwargs):
        seen["lrs"] = {g["name"]: g["lr"] for g in optimizer.param_groups}
        seen["head"] = net.head.weight.detach().clone()
        return real_fit(net, train, val, optimizer=optimizer, **kwargs)

    monkeypatch.setattr(recipes, "fit", spy)
    net, data = lite0_and_data(tiny_folder)
    fresh_head = net.head.weight.detach().clone()
    fine_tune(net, data, strategy="lp-ft", epochs=1, probe_epochs=3, **QUIET)
    assert not torch.equal(seen["head"], fresh_head)  # the probed head, not a random one
    # one small learning rate for every group (the schedule's warm-up scales them alike)
    lrs = seen["lrs"]
    assert lrs["head"] == pytest.approx(lrs["backbone"])


def test_lp_ft_keeps_the_pretrained_batchnorm_statistics_unless_asked(tiny_folder):
    from torch import nn as tnn

    def stats(net):
        return [m.running_mean.clone() for m in net.modules() if isinstance(m, tnn.BatchNorm2d)]

    net, data = lite0_and_data(tiny_folder)
    before = stats(net)
    fine_tune(net, data, strategy="lp-ft", epochs=1, probe_epochs=2, lr=1e-3, **QUIET)
    assert all(torch.equal(a, b) for a, b in zip(before, stats(net)))
    net, data = lite0_and_data(tiny_folder)
    fine_tune(net, data, strategy="finetune", epochs=1, **QUIET)  # updates them, as it always did
    assert not all(torch.equal(a, b) for a, b in zip(before, stats(net)))
    with pytest.raises(ValueError, match="batchnorm='keep'"):
        fine_tune(net, data, strategy="lp-ft", batchnorm="keep", **QUIET)


# ----------------------------------------------------------------------------- issue 10: the default, "auto"


def test_the_command_line_and_fine_tune_share_one_default():
    import inspect

    assert inspect.signature(fine_tune).parameters["strategy"].default == cli.DEFAULTS["strategy"] == "auto"


@pytest.mark.parametrize("shift", [0.1, 0.3])
def test_auto_probes_near_images_and_fine_tunes_far_ones_choosing_on_a_holdout(tmp_path, monkeypatch, shift):
    from conftest import make_image_folder

    root = make_image_folder(tmp_path / "ten", per_class=10)
    net, data = lite0_and_data(root)
    monkeypatch.setattr(recipes, "domain_shift", lambda *a, **k: shift)
    seen = []  # the validation loaders fit was given: what the run chose on
    real_fit = recipes.fit
    monkeypatch.setattr(recipes, "fit", lambda *a, **k: seen.append(len(a[2].dataset)) or real_fit(*a, **k))
    before = backbone_copy(net)
    history = fine_tune(net, data, epochs=1, **QUIET)
    assert history.domain_shift == shift and f"{shift:.2f}" in history.decision
    if shift < recipes.AUTO_SHIFT:  # a probe on all 20 training images; its last epoch is kept
        assert history.kept == "probe" and not changed(before, net)
        assert history.best_epoch == len(history) == 30 and history.selected_on.startswith("nothing")
    else:  # lp-ft: the fine-tuning phase validated on the 4 held-out training images, never on val/
        assert history.probe_epochs == 30 and len(history) == 31 and history.kept in ("probe", "finetune")
        assert seen == [4] and history.selected_on == recipes.HELD_OUT


@pytest.mark.parametrize("tta_wins", [True, False])
def test_auto_weighs_test_time_augmentation_on_the_holdout_and_keeps_it_only_when_it_validates_better(
        tmp_path, monkeypatch, tta_wins):
    from conftest import make_image_folder

    from d2lft.inference import TTA

    net, data = lite0_and_data(make_image_folder(tmp_path / "ten", per_class=10))
    monkeypatch.setattr(recipes, "domain_shift", lambda *a, **k: 0.5)
    monkeypatch.setattr(recipes, "_better", lambda *a: False)  # the fine-tuning phase is kept
    seen = []  # (TTA or not, images) of every evaluation auto made after training

    def fake_evaluate(model, loader, **kwargs):
        seen.append((isinstance(model, TTA), len(loader.dataset)))
        return {"loss": 0.5 if isinstance(model, TTA) == tta_wins else 0.6, "acc": 0.75}

    monkeypatch.setattr(recipes, "evaluate", fake_evaluate)
    history = fine_tune(net, data, epochs=1, **QUIET)
    assert sorted(seen) == [(False, 4), (True, 4)]  # on the 4 held-out training images, never on val/
    if tta_wins:  # "overhead", auto's augmentation for far images: flips and right-angle turns
        assert history.tta == recipes.TTA_VIEWS["overhead"] == {"flip": True, "rotate": True}
        assert "predicts with 8 views" in history.decision
    else:
        assert history.tta is None and "predicts with one view" in history.decision
    assert History.from_dict(history.to_dict()).tta == history.tta


def test_auto_refuses_a_learning_rate_it_would_not_use(tiny_folder, monkeypatch):
    net, data = lite0_and_data(tiny_folder)
    monkeypatch.setattr(recipes, "domain_shift", lambda *a, **k: 0.1)
    with pytest.raises(ValueError, match="only trains the head on these images"):
        fine_tune(net, data, lr=1e-3, **QUIET)


def test_domain_shift_is_zero_on_the_pretraining_statistics_and_grows_with_the_shift(tmp_path):
    from conftest import make_image_folder
    from nets import staged_net

    from d2lft.features import domain_shift
    from d2lft.net import Preprocessing

    data = image_folders(make_image_folder(tmp_path, per_class=8), Preprocessing(image_size=16), batch_size=16,
                         progress=False)
    net = staged_net(num_classes=2)
    for m in net.modules():  # "pretrain" on these very images: running statistics = their statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average
    net.train()
    with torch.no_grad():
        for x, _ in data.loader("train"):
            net(x)
    assert domain_shift(net, data, image_size=16) < 1e-4
    near, far = (image_folders(tmp_path, Preprocessing(image_size=16, mean=(m, m, m)), progress=False)
                 for m in (0.45, 0.2))  # the same images, brighter and brighter after normalisation
    assert 0 < domain_shift(net, near, image_size=16) < domain_shift(net, far, image_size=16)


@pytest.mark.photos
@pytest.mark.slow
def test_domain_shift_separates_imagenet_like_photos_from_satellite_tiles(hymenoptera_root, eurosat_root):
    from d2lft.features import domain_shift

    shifts = {}
    for name, root, size in (("ants", hymenoptera_root, 224), ("eurosat", eurosat_root, 128)):
        net = create_model("efficientnet_lite0")
        shifts[name] = domain_shift(net, image_folders(root, net, image_size=size, progress=False))
    assert shifts["ants"] < recipes.AUTO_SHIFT <= shifts["eurosat"], shifts
