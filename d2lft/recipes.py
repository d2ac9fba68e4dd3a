"""`fine_tune`: the one-call recipe, built from `freeze`, `param_groups`, a scheduler and `fit`.

Strategies (``auto``, the default, then the four columns of chapter 1's table):

- ``auto``: measure how far the training images are from the pretraining data
  (`d2lft.features.domain_shift`). Close (below `AUTO_SHIFT`, photos like ImageNet's): a probe
  on all training images, whose last epoch is kept, so nothing is chosen on ``data.val``. Far
  (satellite tiles, microscopy, drawings): ``lp-ft`` for `AUTO_EPOCHS` epochs, choosing the
  epoch and the phase on a hold-out carved from the training images (`HOLDOUT` of each class;
  on ``data.val`` only when a class has fewer than 10 images, and ``History.selected_on`` says
  so), and there too whether to predict with test-time augmentation: the views of `TTA_VIEWS`,
  the symmetries the training augmentation taught (``History.tta``; predict with
  ``ft.TTA(net, **history.tta)``). ``History.decision`` says what was chosen and why.
- ``probe``: freeze the backbone, cache its features once, train only the new head on them.
- ``finetune``: train everything; the new head learns ``head_lr_mult`` times faster.
- ``lp-ft``: a probe first (so the random head does not wreck the pretrained features), then
  fine-tune everything from the probed head at one small learning rate, with a short warm-up and
  no head multiplier (Kumar et al., 2022); the phase that validates better is kept
  (``History.kept``), so lp-ft never ends below its own probe.
- ``scratch``: train everything with one learning rate; pass a net made with ``pretrained=False``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from d2lft.data import ImageFolderData
from d2lft.device import resolve_device
from d2lft.errors import ConfigError
from d2lft.features import PROBE_EPOCHS, PROBE_LR, domain_shift, probe
from d2lft.freeze import freeze_batchnorm, unfreeze
from d2lft.imbalance import class_counts
from d2lft.inference import TTA
from d2lft.net import Net
from d2lft.optim import make_optimizer, make_scheduler, param_groups
from d2lft.train import History, evaluate, fit

__all__ = ["fine_tune", "selection_split", "STRATEGIES", "BATCHNORM", "AUTO_SHIFT", "AUTO_EPOCHS", "AUTO_AUGMENT",
           "HOLDOUT", "TTA_VIEWS"]

STRATEGIES = ("auto", "probe", "lp-ft", "finetune", "scratch")
#: "auto" fine-tunes when `domain_shift` is at least this. Lite0 (ImageNet) measured 0.15 on ants and
#: bees (0.18 from images cached at 128 px; there the probe, 0.946 +- 0.010 over 3 seeds, beat every
#: fine-tuning recipe we tried), 0.29 on EuroSAT tiles (lp-ft 0.957 +- 0.005 against the probe's 0.93)
#: and 0.26 on the generated shapes.
#: A wrong call costs time, not accuracy: lp-ft keeps its probe when that validates better.
AUTO_SHIFT = 0.2
#: Epochs of all layers in "auto"'s lp-ft, measured on EuroSAT at 128 px: see `fine_tune`.
AUTO_EPOCHS = 8
#: The training augmentation of "auto" when it fine-tunes: images far from ImageNet's photos, in our
#: measurements satellite tiles, have no up; on EuroSAT at 128 px lp-ft reached 0.962 with it and
#: 0.948 with "crop+flip" (seed 0). Pass augment="crop+flip" for far images that have an up.
AUTO_AUGMENT = "overhead"
#: The test-time augmentation "auto" weighs after fine-tuning with each training augmentation: the views
#: that augmentation taught the net to treat alike (`d2lft.TTA`'s options). Satellite tiles have no up:
#: "overhead" trains on all 8 symmetries of the square. On EuroSAT (Lite0, 128 px, the default run, seeds
#: 0-2, one thread) averaging a tile's 8 views moved val/ from 0.946/0.960/0.954 to 0.958/0.960/0.952
#: (+0.003 +- 0.008: within the noise), so it is weighed on the hold-out run by run, not always on.
TTA_VIEWS = {"crop+flip": {"flip": True, "rotate": False}, "crop+flip+color": {"flip": True, "rotate": False},
             "overhead": {"flip": True, "rotate": True}}
#: The fraction of each class of the training images that "auto" (and `d2lft finetune`) chooses on.
HOLDOUT = 0.2
HELD_OUT = f"a hold-out of {HOLDOUT:.0%} of the training images"
#: Fewer training images than this in some class: too few to carve a hold-out from.
MIN_PER_CLASS = 10
#: "update": BatchNorm layers train and their statistics follow the new images; "frozen": they keep
#: ImageNet's statistics and weights (`d2lft.freeze_batchnorm`). lp-ft freezes them by default:
#: measured on this 2-core CPU (Lite0, hold-out carved from train/, val/ reported once), EuroSAT
#: lp-ft at 64 px ended at 0.936 (seeds 0, 1: 0.930, 0.942) with frozen BatchNorm against 0.844
#: (seed 0) with updated statistics; ants/bees lp-ft at 224 px 0.941 against 0.935 (seed 0).
BATCHNORM = ("update", "frozen")
#: The one `fit` option `fine_tune` derives (from the data) rather than takes; the others pass through.
_OWN = {"task"}


def _concat(first: History, second: History) -> History:
    """One history for a two-phase run: the second phase's epochs follow the first's."""
    joined = {}
    for f in dataclasses.fields(History):
        a, b = getattr(first, f.name), getattr(second, f.name)
        joined[f.name] = a + b if isinstance(a, list) else b
    out = History(**joined)
    out.epoch = list(range(1, len(out.epoch) + 1))
    out.probe_epochs = len(first)
    if second.best_epoch is not None:
        out.best_epoch = second.best_epoch + len(first.epoch)
    return out


def _check_rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"fine_tune: {name}={value!r}; expected a positive finite number such as 5e-4")
    return float(value)


def fine_tune(
    net: Net,
    data: ImageFolderData,
    *,
    strategy: str = "auto",
    epochs: int | None = None,
    lr: float | None = None,
    head_lr_mult: float | None = None,
    weight_decay: float = 1e-4,
    optimizer: str = "adamw",
    scheduler: str | None = "warmup_cosine",
    probe_epochs: int = PROBE_EPOCHS,
    probe_lr: float = PROBE_LR,
    batchnorm: str | None = None,
    label_smoothing: float | None = None,
    augment: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    seed: int = 0,
    **fit_options: Any,
) -> History:
    """Fine-tune `net` on `data` with one of `STRATEGIES`; returns the `History` (both phases for lp-ft).

    `epochs` counts the probe's epochs for ``probe`` (default `probe_epochs`), else the epochs of
    training all layers (default 3; `AUTO_EPOCHS` for ``auto``). `lr` is the backbone's learning
    rate (default 5e-4; 1e-3 for lp-ft, whose head is already trained and which warms up and
    keeps BatchNorm frozen); the head gets ``lr * head_lr_mult`` (default 10 for
    ``finetune``, 1 for ``lp-ft`` and ``scratch``). The probe trains the head for `probe_epochs`
    at `probe_lr` on cached features, which takes seconds; ``lr`` does not apply to it.
    `batchnorm` is one of `BATCHNORM` (default "frozen" for lp-ft, "update" otherwise).
    `label_smoothing` (cross-entropy's; default 0.1 for lp-ft on classes, else 0) applies to both of
    lp-ft's phases, so their losses compare. `augment` replaces the data's training
    augmentation with a preset of `d2lft.transforms` (default: the data's own; for ``auto``
    when it fine-tunes, "overhead"). Any other
    keyword argument goes to `d2lft.fit` (``loss_fn``,
    ``best``, ``early_stopping``, ``checkpoint``, ``resume``, ``callbacks`` ...).

    ``auto`` never chooses on ``data.val`` when it can carve a hold-out (see above), so
    ``ft.evaluate(net, data.val)`` afterwards is a fair figure. The other strategies choose (the
    best epoch by fit's `best`, the phase lp-ft keeps) on ``data.val``; to report on images
    nothing was chosen on, pass ``data.holdout(0.2)`` and evaluate on ``data.val`` afterwards.

    Example::

        history = ft.fine_tune(net, data)  # auto
        print(history.decision)
        history = ft.fine_tune(net, data, strategy="lp-ft", epochs=3)
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"fine_tune: strategy={strategy!r}; expected one of {STRATEGIES}")
    if strategy == "auto":
        return _auto(net, data, epochs=epochs, lr=lr, head_lr_mult=head_lr_mult, weight_decay=weight_decay,
                     optimizer=optimizer, scheduler=scheduler, probe_epochs=probe_epochs, probe_lr=probe_lr,
                     batchnorm=batchnorm, label_smoothing=label_smoothing, augment=augment, device=device,
                     progress=progress, seed=seed, **fit_options)
    if augment is not None and augment != data.augment:
        data = data.with_augment(augment)  # train_transform checks the preset's name
    if batchnorm is None:
        batchnorm = "frozen" if strategy == "lp-ft" else "update"
    if batchnorm not in BATCHNORM:
        raise ConfigError(f"fine_tune: batchnorm={batchnorm!r}; expected one of {BATCHNORM}")
    clash = sorted(_OWN & set(fit_options))
    if clash:
        raise ConfigError(f"fine_tune: {clash[0]}= is fine_tune's own option, not one to pass through to fit")
    if label_smoothing is None:
        label_smoothing = 0.1 if strategy == "lp-ft" and data.target == "class" else 0.0
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0 <= label_smoothing < 1:
        raise ConfigError(f"fine_tune: label_smoothing={label_smoothing!r}; expected a number in [0, 1) such as 0.1")
    if label_smoothing:
        if fit_options.get("loss_fn") is not None:
            raise ConfigError("fine_tune: give label_smoothing or loss_fn, not both (put the smoothing in your loss)")
        if data.target != "class":
            raise ConfigError("fine_tune: label_smoothing applies to classes; this data has regression targets")
        fit_options["loss_fn"] = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if strategy == "probe" and lr is not None:
        raise ConfigError(f"fine_tune: lr={lr!r} is the backbone's learning rate, and strategy='probe' trains only "
                          "the head: set probe_lr instead")
    lr = _check_rate("lr", (1e-3 if strategy == "lp-ft" else 5e-4) if lr is None else lr)
    probe_lr = _check_rate("probe_lr", probe_lr)
    if head_lr_mult is None:
        head_lr_mult = 10.0 if strategy == "finetune" else 1.0
    head_lr_mult = _check_rate("head_lr_mult", head_lr_mult)
    device = resolve_device(device)
    task = "classification" if data.target == "class" else "regression"
    if net.num_outputs != data.num_outputs:
        raise ConfigError(
            f"the net's head has {net.num_outputs} outputs but the data needs {data.num_outputs} "
            f"({data.classes}); make it with ft.create_model(..., num_classes={data.num_outputs})"
        )
    if strategy == "probe" and epochs is not None:
        probe_epochs = epochs
    epochs = 3 if epochs is None else epochs
    net.to(device)
    if strategy in ("probe", "lp-ft"):
        probed = probe(net, data, epochs=probe_epochs, lr=probe_lr, weight_decay=weight_decay, seed=seed,
                       device=device, progress=progress, best=fit_options.get("best", "val_loss"),
                       loss_fn=fit_options.get("loss_fn"))  # the phases compare on one loss
        probed.probe_epochs = len(probed)
        probed_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        unfreeze(net)
        if strategy == "probe" or probed.halted:
            probed.kept = "probe"
            return probed  # an interrupted or diverged probe does not go on to fine-tune
    if batchnorm == "frozen":
        freeze_batchnorm(net.backbone)
    groups = param_groups(net, lr=lr, head_lr_mult=head_lr_mult, weight_decay=weight_decay)
    opt = make_optimizer(groups, optimizer)
    if scheduler == "warmup_cosine":  # a short warm-up: half an epoch, or a fifth of a short run
        scheduler = make_scheduler(opt, "warmup_cosine", epochs=epochs, steps_per_epoch=len(data.train),
                                   warmup_epochs=min(0.5, epochs / 5))
    history = fit(net, data.train, data.val, epochs=epochs, optimizer=opt, scheduler=scheduler, task=task,
                  device=device, progress=progress, seed=seed, **fit_options)
    if strategy != "lp-ft":
        history.kept = strategy
        return history
    joined = _concat(probed, history)
    if _better(probed, history, fit_options.get("best", "val_loss")):
        net.load_state_dict(probed_state)  # the fine-tuning phase validated worse: hand back the probe
        joined.kept, joined.best_epoch, joined.best_value = "probe", probed.best_epoch, probed.best_value
    else:
        joined.kept = "finetune"
    return joined


def _auto(net: Net, data: ImageFolderData, *, epochs: int | None, seed: int, device: Any, **options: Any) -> History:
    """Strategy "auto": a probe for images like the pretraining data, lp-ft chosen on a hold-out for others."""
    device = resolve_device(device)
    shift = domain_shift(net, data, device=device)
    if shift < AUTO_SHIFT:
        if options["lr"] is not None:
            raise ConfigError(f"fine_tune: lr={options['lr']!r} is the backbone's learning rate, and strategy='auto' "
                              f"only trains the head on these images (domain shift {shift:.2f} < {AUTO_SHIFT}): "
                              "drop lr, or choose strategy='lp-ft' or 'finetune'")
        options.setdefault("best", None)  # the last epoch: nothing is chosen on data.val
        options.pop("lr")
        options.pop("augment")  # the probe trains on cached features of unaugmented images
        history = fine_tune(net, data, strategy="probe", seed=seed, device=device, **options)
        history.selected_on = ("nothing: the probe's last epoch is kept" if options["best"] is None
                               else f"val (the best epoch by {options['best']})")
        history.decision = (f"a linear probe on all {len(data.train_dataset)} training images: they look like "
                            f"the pretraining data (domain shift {shift:.2f} < {AUTO_SHIFT})")
    else:
        select, where = selection_split(data.with_augment(options.pop("augment") or AUTO_AUGMENT), seed=seed)
        history = fine_tune(net, select, strategy="lp-ft", epochs=AUTO_EPOCHS if epochs is None else epochs,
                            seed=seed, device=device, **options)
        history.selected_on = where
        history.tta, weighed = _choose_tta(net, select, history, options.get("best", "val_loss"), device)
        history.decision = (f"lp-ft (a probe, then all layers for {len(history) - history.probe_epochs} epochs, "
                            f"{select.augment!r} augmentation): the "
                            f"images are far from the pretraining data (domain shift {shift:.2f} >= {AUTO_SHIFT}); "
                            f"kept the {history.kept} phase, which validated better on {where}" + weighed)
    history.domain_shift = shift
    return history


def _choose_tta(net: Net, select: ImageFolderData, history: History, monitor: str | None,
                device: Any) -> tuple[dict[str, bool] | None, str]:
    """`TTA_VIEWS` for the training augmentation when its averaged views validate better (by `monitor`, on
    the images the run chose on) than the net alone; and the comparison in words for the decision."""
    views = TTA_VIEWS.get(select.augment)
    # nothing to weigh without a monitor, or after a halted run; a kept probe was trained on
    # unaugmented images, so it learned no symmetry
    if views is None or monitor is None or history.halted or history.kept != "finetune":
        return None, ""
    key = {"val_loss": "loss", "val_acc": "acc"}.get(monitor)
    if key is None:
        return None, ""
    tta = TTA(net, **views)
    plain, averaged = evaluate(net, select.val, device=device), evaluate(tta, select.val, device=device)
    n = tta.num_views
    better = averaged[key] > plain[key] if key == "acc" else averaged[key] < plain[key]
    said = (f"; predicts with {n} views (flips{' and right-angle turns' if views['rotate'] else ''}, "
            f"validation {key} {averaged[key]:.3f} against {plain[key]:.3f} for one view)" if better else
            f"; predicts with one view (validation {key} {plain[key]:.3f}, against {averaged[key]:.3f} with {n})")
    return (dict(views) if better else None), said


def selection_split(data: ImageFolderData, *, seed: int = 0) -> tuple[ImageFolderData, str]:
    """The data to choose on, and where that is in words: a hold-out of `HOLDOUT` of each class of the
    training images when every class has at least `MIN_PER_CLASS` of them, else ``data`` itself."""
    fewest = (int(class_counts(data.train_dataset, len(data.classes)).min()) if data.target == "class"
              else len(data.train_dataset))
    if fewest >= MIN_PER_CLASS:
        return data.holdout(HOLDOUT, seed=seed), HELD_OUT
    return data, (f"val (fewer than {MIN_PER_CLASS} training images in some class, too few to carve a "
                  "hold-out: the reported figure also chose)")


def _better(first: History, second: History, monitor: str | None) -> bool:
    """True when `first`'s best epoch validated strictly better than `second`'s (by `monitor`)."""
    if monitor is None or first.best_value is None:
        return False
    if second.best_value is None or not math.isfinite(second.best_value):
        return True
    return first.best_value > second.best_value if monitor == "val_acc" else first.best_value < second.best_value
