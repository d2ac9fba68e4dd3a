"""fit, History, early stopping, faults, checkpoints and resume, on tiny generated tensors."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nets import tiny_net

from d2lft.callbacks import EarlyStopping
from d2lft.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from d2lft.device import get_device, set_seed
from d2lft.freeze import GradualUnfreezing
from d2lft.net import Net, Preprocessing
from d2lft.train import History, evaluate, fit, predict

QUIET = {"progress": False, "device": "cpu"}


def images(n: int = 48, *, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is whether their red channel is brighter than their blue one (learnable)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > x[:, 2].mean((1, 2))).long()
    return x, y


def loader(x, y, *, batch_size: int = 8, shuffle: bool = False, seed: int | None = None) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)


def sgd(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)


class Snapshots:
    """Callback: the weights at the end of every epoch, and the epochs it saw."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.starts: list[int] = []

    def on_epoch_start(self, run) -> None:
        self.starts.append(run.epoch)

    def on_epoch_end(self, run) -> None:
        self.weights.append(copy.deepcopy(run.net.state_dict()))


def same_weights(net: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.allclose(v, state[k]) for k, v in net.state_dict().items())


# ----------------------------------------------------------------------------- the loop


def test_loss_decreases_and_history_is_complete() -> None:
    x, y = images()
    data = loader(x, y, shuffle=True, seed=0)
    history = fit(tiny_net(), data, loader(*images(seed=2)), epochs=6, lr=3e-3, seed=0, **QUIET)
    assert len(history) == 6 and history.epoch == [1, 2, 3, 4, 5, 6]
    assert history.train_loss[-1] < 0.8 * history.train_loss[0]
    assert history.train_acc[-1] > 0.7 and 0 <= history.val_acc[-1] <= 1
    assert history.val_mae == [None] * 6 and all(s > 0 for s in history.images_per_second)
    assert history.best_epoch == 1 + min(range(6), key=history.val_loss.__getitem__)
    d = history.to_dict()
    assert d["train_loss"] == history.train_loss and History.from_dict(d) == history


def test_fit_equals_a_hand_written_loop() -> None:
    """Golden reference: fit with SGD takes exactly the steps of the chapter-1 loop."""
    x, y = images()
    hand = tiny_net()
    optimizer = sgd(hand)
    set_seed(0)
    data = loader(x, y, shuffle=True)  # shuffled by the global torch RNG that set_seed seeded
    for _ in range(3):
        hand.train()
        for xb, yb in data:
            loss = nn.functional.cross_entropy(hand(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    net = tiny_net()
    history = fit(net, loader(x, y, shuffle=True), epochs=3, optimizer=sgd(net), seed=0, amp=False,
                  channels_last=False, **QUIET)
    assert len(history) == 3
    for (name, a), b in zip(net.state_dict().items(), hand.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_same_seed_same_history() -> None:
    def run() -> tuple[History, Net]:
        set_seed(3)
        net = tiny_net(seed=5, dropout=0.3)
        x, y = images()
        history = fit(net, loader(x, y, shuffle=True), loader(*images(seed=2)), epochs=2, seed=7, **QUIET)
        return history, net

    (h1, n1), (h2, n2) = run(), run()
    assert h1.train_loss == h2.train_loss and h1.val_loss == h2.val_loss and h1.val_acc == h2.val_acc
    assert same_weights(n1, n2.state_dict())


def test_the_same_seed_on_the_same_loader_trains_the_same_again() -> None:
    # A cell run twice in a notebook: the loader's shuffling generator must not carry on from the first run.
    x, y = images()
    train, val = loader(x, y, shuffle=True, seed=0), loader(*images(seed=2))
    runs = []
    for _ in range(2):
        net = tiny_net(seed=5, dropout=0.3)
        runs.append((fit(net, train, val, epochs=2, seed=7, **QUIET), net))
    (h1, n1), (h2, n2) = runs
    assert h1.train_loss == h2.train_loss and h1.val_loss == h2.val_loss
    assert same_weights(n1, n2.state_dict())
    other = tiny_net(seed=5, dropout=0.3)
    assert fit(other, train, val, epochs=2, seed=8, **QUIET).train_loss != h1.train_loss  # the seed matters


def test_regression_records_mae_with_float_targets() -> None:
    x, _ = images()
    target = x[:, 0].mean((1, 2)) * 3  # shape (N,), the net outputs (N, 1)
    data = loader(x, target, shuffle=True, seed=0)
    history = fit(tiny_net(1), data, data, epochs=5, lr=1e-2, task="regression", best="val_mae", seed=0, **QUIET)
    assert history.val_acc == [None] * 5 and history.train_acc == [None] * 5
    assert history.val_mae[-1] < history.val_mae[0]
    assert history.best_value == min(history.val_mae)


def test_scheduler_by_name_is_stepped_per_batch() -> None:
    x, y = images(32)
    net = tiny_net()
    history = fit(net, loader(x, y), epochs=3, optimizer=sgd(net), scheduler="cosine", **QUIET)
    assert history.lr[0] == pytest.approx(0.1)
    assert history.lr[0] > history.lr[1] > history.lr[2] > 0


def test_callbacks_see_every_epoch_from_zero() -> None:
    snaps = Snapshots()
    x, y = images(16)
    fit(tiny_net(), loader(x, y), epochs=3, callbacks=[snaps], **QUIET)
    assert snaps.starts == [0, 1, 2] and len(snaps.weights) == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": 0}, "epochs must be an int >= 1, got 0"),
        ({"epochs": 2.5}, "epochs must be an int >= 1, got 2.5"),
        ({"lr": -1.0}, "lr must be a positive finite number"),
        ({"lr": math.nan}, "lr must be a positive finite number"),
        ({"task": "segmentation"}, "task='segmentation' is not one of"),
        ({"best": "val_f1"}, "best='val_f1' is not one of"),
        ({"task": "regression", "best": "val_acc"}, "best='val_acc' does not exist for task='regression'"),
        ({"early_stopping": 0}, "patience must be None or an int >= 1"),
        ({"val": None, "early_stopping": 2}, "early_stopping=2 needs a val_loader"),
        ({"train": loader(torch.zeros(0, 3, 8, 8), torch.zeros(0).long())}, "train_loader is empty"),
        ({"callbacks": [GradualUnfreezing]}, "write GradualUnfreezing()"),
    ],
)
def test_bad_arguments_fail_before_training(kwargs: dict, message: str) -> None:
    x, y = images(8)
    kwargs = {"epochs": 1, **kwargs}
    train = kwargs.pop("train", loader(x, y))
    val = kwargs.pop("val", loader(x, y))
    net = tiny_net()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        fit(net, train, val, **kwargs, **QUIET)
    assert same_weights(net, before)


# ----------------------------------------------------------------------------- best weights and faults


def test_early_stopping_stops_and_restores_the_best_weights() -> None:
    x, y = images()
    # Validation labels are flipped: the better the net learns, the worse its validation loss.
    snaps = Snapshots()
    net = tiny_net()
    history = fit(net, loader(x, y), loader(x, 1 - y), epochs=20, lr=3e-3, early_stopping=2, callbacks=[snaps],
                  seed=0, **QUIET)
    assert history.stopped_early and len(history) < 20
    assert history.best_epoch == 1 + min(range(len(history)), key=history.val_loss.__getitem__)
    assert len(history) == history.best_epoch + 2
    assert history.stop_reason == "early_stopping" and "did not improve for 2 epochs" in history.stop_message
    assert same_weights(net, snaps.weights[history.best_epoch - 1])
    assert not same_weights(net, snaps.weights[-1])


def test_early_stopping_tracker_modes() -> None:
    stopper = EarlyStopping(patience=1, monitor="val_acc")
    assert stopper.update(0.5, epoch=1) and not stopper.update(0.5, epoch=2)  # a tie is no improvement
    assert stopper.should_stop and stopper.best_epoch == 1
    assert not EarlyStopping(None).should_stop


class FailAt(nn.Module):
    """A loss function that returns NaN, or raises KeyboardInterrupt, at one (epoch, step)."""

    def __init__(self, epoch: int, step: int, steps_per_epoch: int, *, fault: str) -> None:
        super().__init__()
        self.at, self.calls, self.fault = (epoch - 1) * steps_per_epoch + step, 0, fault

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(out, y)
        if torch.is_grad_enabled():  # count training steps only, not validation batches
            self.calls += 1
            if self.calls == self.at:
                if self.fault == "interrupt":
                    raise KeyboardInterrupt
                return loss * math.nan
        return loss


def test_non_finite_loss_stops_with_a_reason_and_keeps_the_best_weights() -> None:
    x, y = images(32)  # 4 steps per epoch
    snaps = Snapshots()
    net = tiny_net()
    with pytest.warns(RuntimeWarning, match="non-finite loss at epoch 2 step 3"):
        history = fit(net, loader(x, y), loader(x, y), epochs=4, lr=1e-2, loss_fn=FailAt(2, 3, 4, fault="nan"),
                      callbacks=[snaps], **QUIET)
    assert history.stop_reason == "non_finite_loss" and history.halted
    assert history.stop_message == "non-finite loss at epoch 2 step 3"
    assert len(history) == 1 and not history.interrupted and not history.stopped_early
    assert all(torch.isfinite(v).all() for v in net.state_dict().values())
    assert same_weights(net, snaps.weights[0])


def test_non_finite_loss_in_the_first_epoch_returns_to_the_initial_weights() -> None:
    x, y = images(16)
    net = tiny_net()
    initial = copy.deepcopy(net.state_dict())
    with pytest.warns(RuntimeWarning, match="epoch 1 step 2"):
        history = fit(net, loader(x, y), epochs=2, loss_fn=FailAt(1, 2, 2, fault="nan"), **QUIET)
    assert len(history) == 0 and same_weights(net, initial)


def test_keyboard_interrupt_returns_the_history_and_the_best_weights() -> None:
    x, y = images(32)
    snaps = Snapshots()
    net = tiny_net()
    with pytest.warns(RuntimeWarning, match="interrupted .* stopped after 2 finished epoch.* kept the best weights"):
        history = fit(net, loader(x, y), loader(x, y), epochs=5, loss_fn=FailAt(3, 2, 4, fault="interrupt"),
                      callbacks=[snaps], **QUIET)
    assert history.interrupted and history.halted and len(history) == 2
    assert history.stop_reason == "interrupted" and history.stop_message == "interrupted (Ctrl-C) during epoch 3"
    assert same_weights(net, snaps.weights[history.best_epoch - 1])


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path) -> None:
    net = tiny_net()
    optimizer = sgd(net)
    history = History(epoch=[1], train_loss=[0.5])
    path = save_checkpoint(tmp_path / "sub" / "run.pt", net=net, optimizer=optimizer, history=history, epoch=1,
                           extra={"classes": ["ants", "bees"]})
    other = tiny_net(seed=9)
    data = load_checkpoint(path, other, optimizer=sgd(other))
    assert same_weights(other, net.state_dict())
    assert data["epoch"] == 1 and data["extra"]["classes"] == ["ants", "bees"]
    assert History.from_dict(data["history"]) == history
    assert [p.name for p in path.parent.iterdir()] == ["run.pt"]


def test_a_failed_save_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    path = save_checkpoint(tmp_path / "run.pt", net=tiny_net(), epoch=1)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, net=tiny_net(seed=3), epoch=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]


def test_bad_checkpoint_files_raise_one_clear_error(tmp_path) -> None:
    net = tiny_net()
    good = save_checkpoint(tmp_path / "good.pt", net=net)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: cannot read it.*truncated") as info:
        load_checkpoint(truncated, net)
    assert info.value.__cause__ is None and info.value.__suppress_context__

    noise = tmp_path / "noise.pt"
    noise.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="noise.pt: cannot read it as a PyTorch checkpoint"):
        load_checkpoint(noise, net)

    other = tmp_path / "other.pt"
    torch.save({"hello": "world"}, other)
    with pytest.raises(CheckpointError, match="other.pt: not a d2lft checkpoint"):
        load_checkpoint(other, net)

    with pytest.raises(CheckpointError, match="missing.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt", net)


def test_a_checkpoint_of_another_model_lists_what_differs(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "run.pt", net=tiny_net(5))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, tiny_net(2))
    text = str(info.value)
    assert "run.pt" in text and "saved from Net 'tiny' with 5 outputs" in text
    assert "head.1.weight: checkpoint (5, 8) vs model (2, 8)" in text
    assert "ft.create_model('tiny', num_classes=5)" in text

    with pytest.raises(CheckpointError, match=r"missing keys \(2\): 0.weight, 0.bias"):
        load_checkpoint(path, nn.Sequential(nn.Linear(8, 5)))


def test_a_plain_state_dict_loads(tmp_path) -> None:
    net = tiny_net()
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    other = tiny_net(seed=4)
    load_checkpoint(tmp_path / "weights.pt", other)
    assert same_weights(other, net.state_dict())


def test_fit_checkpoints_last_and_best_weights(tmp_path) -> None:
    x, y = images()
    snaps = Snapshots()
    net = tiny_net()
    history = fit(net, loader(x, y), loader(x, 1 - y), epochs=3, lr=3e-3, checkpoint=tmp_path / "run.pt",
                  callbacks=[snaps], **QUIET)
    assert history.best_epoch == 1
    last, best = tiny_net(seed=8), tiny_net(seed=8)
    data = load_checkpoint(tmp_path / "run.pt", last)
    load_checkpoint(tmp_path / "run.pt", best, best=True)
    assert data["epoch"] == 3 and same_weights(last, snaps.weights[2]) and same_weights(best, snaps.weights[0])


def test_a_checkpoint_saves_plain_data_with_every_epoch(tmp_path) -> None:
    from d2lft.callbacks import Checkpoint

    x, y = images()
    history = fit(tiny_net(), loader(x, y), loader(x, y), epochs=2, lr=3e-3, **QUIET,
                  checkpoint=Checkpoint(tmp_path / "run.pt", extra={"classes": ["a", "b"]}))
    data = load_checkpoint(tmp_path / "run.pt", tiny_net())  # e.g. written just before a crash: it says what it is
    assert data["extra"] == {"classes": ["a", "b"]} and data["epoch"] == len(history) == 2


def test_load_finetuned_reads_the_file_once_and_hands_back_the_best_weights(tmp_path, monkeypatch) -> None:
    from d2lft.checkpoint import load_finetuned
    from d2lft.models import create_model

    net = create_model("efficientnet_lite0", num_classes=2, pretrained=False)
    best = {k: v + 1 if v.is_floating_point() else v for k, v in net.state_dict().items()}
    path = save_checkpoint(tmp_path / "run.pt", net=net, best_model=best,
                           extra={"classes": ["ants", "bees"], "model": "efficientnet_lite0"})
    reads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: reads.append(args) or real_load(*args, **kwargs))
    loaded = load_finetuned(path)
    assert len(reads) == 1 and loaded.categories == ["ants", "bees"]
    assert all(torch.equal(v, best[k]) for k, v in loaded.state_dict().items())  # what the run handed back


def test_an_early_stopped_run_is_the_first_epochs_of_the_whole_run() -> None:
    # chapter 7 replays EarlyStopping on a whole run's curve instead of training again; it scores each
    # epoch with a callback that forks torch's generator (a DataLoader draws from it when it starts)
    x, y = images()
    val = loader(*images(seed=2))

    class Score:
        def __init__(self) -> None:
            self.acc: list[float] = []

        def on_epoch_end(self, run) -> None:
            with torch.random.fork_rng(devices=[]):
                self.acc.append(evaluate(run.net, loader(x, y), device="cpu")["acc"])

    def run(**options):
        torch.manual_seed(0)
        net = tiny_net()
        history = fit(net, loader(x, y, shuffle=True, seed=0), val, epochs=12, lr=0.3, scheduler="cosine",
                      seed=0, **QUIET, **options)  # a fresh loader per run: the same batches
        return net, history

    score = Score()
    _, whole = run(best=None, callbacks=[score])
    stopped_net, stopped = run(early_stopping=1)
    assert len(stopped) < len(whole)  # the stopper stopped: the comparison below is not vacuous
    assert stopped.val_loss == whole.val_loss[:len(stopped)] and stopped.train_loss == whole.train_loss[:len(stopped)]
    stopper = EarlyStopping(1, monitor="val_loss")
    for epoch, value in enumerate(whole.val_loss, start=1):
        stopper.update(value, epoch=epoch)
        if stopper.should_stop:
            break
    assert (epoch, stopper.best_epoch) == (len(stopped), stopped.best_epoch)
    assert evaluate(stopped_net, loader(x, y), device="cpu")["acc"] == score.acc[stopped.best_epoch - 1]


def test_a_run_that_chose_tta_predicts_with_it_after_loading(tmp_path) -> None:
    from matplotlib.cbook import get_sample_data

    from d2lft.checkpoint import load_finetuned
    from d2lft.inference import TTA, classify
    from d2lft.models import create_model

    photo = get_sample_data("grace_hopper.jpg", asfileobj=False)
    torch.manual_seed(0)
    net = create_model("efficientnet_lite0", num_classes=2).eval()
    nn.init.normal_(net.head.weight, std=0.5)  # a head that tells the views apart
    extra = {"classes": ["ants", "bees"], "model": "efficientnet_lite0"}
    plain = load_finetuned(save_checkpoint(tmp_path / "plain.pt", net=net, extra=extra))
    turned = load_finetuned(save_checkpoint(tmp_path / "tta.pt", net=net,
                                            extra={**extra, "tta": {"flip": True, "rotate": True}}))
    assert plain.tta is None and turned.tta == {"flip": True, "rotate": True}
    from d2lft.images import load_image

    x = turned.transforms(crop_fraction=1.0)(load_image(photo))[None]
    with torch.no_grad():
        want = TTA(net, flip=True, rotate=True)(x).exp()[0]
    got = dict(classify(turned, [photo], topk=2)[0])
    assert got["bees"] == pytest.approx(float(want[1]), abs=1e-5)
    assert abs(dict(classify(plain, [photo], topk=2)[0])["bees"] - got["bees"]) > 1e-3


class InterruptAt:
    """Callback: Ctrl-C at the start of one epoch."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, run) -> None:
        if run.epoch == self.epoch:
            raise KeyboardInterrupt


def test_resume_continues_the_run_exactly(tmp_path) -> None:
    x, y = images()
    val = loader(*images(seed=2))

    def run(*, extra=(), resume=None, checkpoint=None) -> tuple[History, Net, GradualUnfreezing]:
        net = tiny_net(dropout=0.2)
        unfreezing = GradualUnfreezing(every=1)
        history = fit(net, loader(x, y, shuffle=True, seed=0), val, epochs=4, lr=3e-3, weight_decay=1e-2,
                      scheduler="cosine", callbacks=[unfreezing, *extra], checkpoint=checkpoint, resume=resume,
                      seed=0, **QUIET)
        return history, net, unfreezing

    whole, whole_net, _ = run()
    with pytest.warns(RuntimeWarning, match="interrupted"):
        first, _, _ = run(extra=[InterruptAt(2)], checkpoint=tmp_path / "run.pt")
    assert first.interrupted and len(first) == 2
    resumed, resumed_net, unfreezing = run(resume=tmp_path / "run.pt")
    assert len(resumed) == 4 and unfreezing.unfrozen_ == 2
    assert resumed.train_loss == pytest.approx(whole.train_loss, rel=1e-5)
    assert resumed.val_loss == pytest.approx(whole.val_loss, rel=1e-5)
    assert resumed.lr == pytest.approx(whole.lr)
    for (name, a), b in zip(resumed_net.state_dict().items(), whole_net.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


def test_resume_with_other_callbacks_is_refused(tmp_path) -> None:
    x, y = images(16)
    fit(tiny_net(), loader(x, y), epochs=1, callbacks=[GradualUnfreezing()], checkpoint=tmp_path / "run.pt", **QUIET)

    class Stateful:
        def on_epoch_end(self, run):
            pass

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    with pytest.raises(CheckpointError, match=r"'GradualUnfreezing'\], but got \['EarlyStopping', 'Stateful'\]"):
        fit(tiny_net(), loader(x, y), epochs=2, callbacks=[Stateful()], resume=tmp_path / "run.pt", **QUIET)


# ----------------------------------------------------------------------------- evaluate, predict, device


def test_evaluate_and_predict_keep_the_layer_modes() -> None:
    net = tiny_net()
    net.train()
    net.backbone.stem[1].eval()  # e.g. a frozen BatchNorm set_train_mode left in eval
    modes = [m.training for m in net.modules()]
    x, y = images(10)
    data = loader(x, y, batch_size=4)
    metrics = evaluate(net, data)
    assert set(metrics) == {"loss", "acc", "count"} and metrics["count"] == 10
    probs, targets = predict(net, data)
    assert probs.shape == (10, 2) and torch.allclose(probs.sum(1), torch.ones(10)) and torch.equal(targets, y)
    assert [m.training for m in net.modules()] == modes
    net.eval()
    expected = nn.functional.cross_entropy(net(x), y).item()
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)


def test_evaluation_on_the_cpu_folds_batchnorm_into_a_copy_and_leaves_the_net_as_it_was() -> None:
    # Lite0's conv-BN blocks, folded for evaluation: the outputs of the network as it is, to float
    # rounding; the network itself keeps its BatchNorm layers, their statistics and its layout.
    from d2lft.loop import folded_batchnorm
    from d2lft.models import create_model

    net = create_model("efficientnet_lite0", num_classes=3, pretrained=False)
    set_seed(0)
    for m in net.modules():  # statistics and affine weights that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5); m.running_var.uniform_(0.5, 2.0); m.weight.data.uniform_(0.5, 1.5)
    before = copy.deepcopy(net.state_dict())
    x = torch.randn(6, 3, 64, 64)
    data = loader(x, torch.tensor([0, 1, 2, 0, 1, 2]), batch_size=4)
    net.eval()
    with torch.no_grad():
        expected = net(x).softmax(1)
    probs, _ = predict(net, data, device="cpu")
    assert torch.allclose(probs, expected, atol=1e-5), (probs - expected).abs().max()
    state = net.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 49
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded_batchnorm(net).modules())  # all 49 fold


def test_a_hook_on_the_net_sees_evaluation_unfolded() -> None:
    # a forward hook (as domain_shift registers on BatchNorm layers) must run on the net's own layers
    net = tiny_net()
    seen = []
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    handle = bn.register_forward_hook(lambda module, inputs, output: seen.append(module))
    x, y = images(6)
    evaluate(net, loader(x, y, batch_size=3), device="cpu")
    handle.remove()
    assert seen and all(m is bn for m in seen)


def test_get_device_never_returns_none() -> None:
    device = get_device()
    assert isinstance(device, torch.device)
    if not torch.cuda.is_available():
        assert device.type in ("cpu", "mps")


# ----------------------------------------------------------------------------- what fit leaves alone


def test_fit_refuses_images_normalised_for_other_weights() -> None:
    x, y = images(8)
    data = loader(x, y)
    data.dataset.preprocessing = Preprocessing()  # as image_folders marks its datasets: ImageNet's statistics
    net = tiny_net()
    net.preprocessing = Preprocessing(mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match=r"expects mean \(0.5, 0.5, 0.5\).*ft.image_folders\(root, net\)"):
        fit(net, data, epochs=1, **QUIET)
    net.preprocessing = Preprocessing()
    assert len(fit(net, data, epochs=1, **QUIET)) == 1


def test_fit_leaves_the_net_in_the_usual_memory_format_and_the_allocator_alone(monkeypatch) -> None:
    import d2lft.device

    calls = []
    monkeypatch.setattr(d2lft.device, "keep_freed_memory", lambda *a, **k: calls.append(1))
    net = tiny_net()
    x, y = images(16)
    fit(net, loader(x, y), epochs=1, channels_last=True, **QUIET)
    conv = net.backbone.stem[0].weight
    assert conv.is_contiguous() and not calls
