"""The `d2lft` command line: fine-tune, predict, manage datasets, benchmark.

    d2lft finetune DATA_DIR [--model NAME] [--strategy S] [--epochs N] [--val-split F] [--json PATH]
                   [--checkpoint PATH [--resume]]
    d2lft predict IMAGE... [--model NAME | --checkpoint PATH] [--topk K]
    d2lft export CHECKPOINT --out PATH
    d2lft data list | d2lft data download NAME
    d2lft bench [--model NAME] [--image-size N] [--device cpu|cuda] [--to-accuracy A [--max-epochs N]]

Errors a user can fix (a wrong folder, a bad setting, no network: every `d2lft.errors.D2LFTError`)
print one line and exit with status 1; usage errors exit with status 2 (argparse's convention).
Output paths are checked before any work starts, and the final writes survive a second Ctrl-C.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from d2lft.errors import ConfigError, D2LFTError

__all__ = ["main", "run_finetune", "DEFAULTS"]

#: The command line's defaults, chosen by measurement on a 2-core CPU (ants vs bees, 244 train
#: images): a probe on cached 224 px features reached val acc 0.948 in 18 s of wall time, while
#: lp-ft at 160 px (probe, then 2 epochs of all layers) reached 0.902 in 74 s. A checkpoint records
#: the settings its run used, so --resume continues with them.
DEFAULTS = {
    "model": "efficientnet_lite0",
    "strategy": "auto",
    "epochs": None,
    "image_size": None,  # the model's, or twice the images' shorter side when that is smaller (auto_image_size)
    "batch_size": 32,
    "lr": None,
    "augment": None,  # crop+flip; "auto" fine-tunes far images with "overhead" (d2lft.recipes.AUTO_AUGMENT)
    "batchnorm": None,
    "val_split": None,  # use val/ (or test/)
    "seed": 0,
}


def run_finetune(
    data_dir: str | Path,
    *,
    model: str | None = None,
    strategy: str | None = None,
    epochs: int | None = None,
    image_size: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    augment: str | None = None,
    batchnorm: str | None = None,
    val_split: float | None = None,
    seed: int | None = None,
    device: str | torch.device | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """What ``d2lft finetune DATA_DIR`` does: load the folder, fine-tune, and report the figures.

    A setting left at None takes its `DEFAULTS` value, or, with `resume`, the value the run in
    `checkpoint` was started with (a setting given that differs from it is refused, as is other
    data). The checkpoint is written after every epoch of training the backbone, so `resume`
    continues an interrupted run from its last finished epoch, with its best weights and history.
    On a CPU with bfloat16 instructions its evaluation passes (features, validation, the report)
    run in bfloat16 (`d2lft.device.bf16_evaluation`); training stays in float32.

    Returns a JSON-ready dict: val_acc, per_class_recall, confusion_matrix and misclassified (of the
    model handed back, on val/, with the test-time augmentation it chose: tta), selected_on, kept,
    best_val_acc, epochs, probe_epochs,
    train_seconds, images_per_second, skipped, model, strategy (and the settings used).
    """
    from d2lft.callbacks import Checkpoint
    from d2lft.data import image_folders
    from d2lft.device import bf16_evaluation, resolve_device, set_seed
    from d2lft.distributed import is_main_process
    from d2lft.models import create_model, replace_head
    from d2lft.recipes import AUTO_AUGMENT, HELD_OUT, fine_tune, selection_split

    start = time.perf_counter()
    given = {"model": model, "strategy": strategy, "epochs": epochs, "image_size": image_size,
             "batch_size": batch_size, "lr": lr, "augment": augment, "batchnorm": batchnorm,
             "val_split": val_split, "seed": seed}
    saved = _resumable(checkpoint) if resume else None  # a run that cannot resume fails now, in one line
    settings = _settings(given, saved, checkpoint)
    model, strategy, seed, val_split = settings["model"], settings["strategy"], settings["seed"], settings["val_split"]
    device = resolve_device(device)  # a device that is not here fails now, not after caching the images
    set_seed(seed)
    net = create_model(model, pretrained=strategy != "scratch")
    image_size = settings["image_size"] or auto_image_size(data_dir, net.preprocessing.image_size, val_split=val_split)
    settings["image_size"] = image_size
    data = image_folders(data_dir, net, image_size=image_size, batch_size=settings["batch_size"], seed=seed,
                         val_split=val_split, progress=progress and is_main_process())
    if saved is not None:
        _check_same_data(saved, data, checkpoint)
        if progress and is_main_process():
            print(f"resuming {checkpoint} after epoch {saved['epoch']} of training the backbone")
    replace_head(net, len(data.classes))
    extra = {"classes": data.classes, "model": model, "image_size": image_size,
             "preprocessing": dataclasses.asdict(data.preprocessing), "settings": settings,
             "train_images": len(data.train_dataset)}
    # What the run chooses (the best epoch, lp-ft's phase) it chooses on a hold-out carved from train/,
    # so the val/ figure it reports chose nothing; "auto" carves its own when it fine-tunes (fine_tune),
    # a probe's 30 epochs on cached features choose on val/, and the report says so.
    select, selected_on = None, "val/ (the reported figure also chose the epoch)"
    if strategy not in ("probe", "auto"):
        select, selected_on = selection_split(data, seed=seed)
        select = select if select is not data else None
    # fit saves the run after every epoch of training the backbone, with what it is (extra): resumable
    # even after a crash. A probe's epochs on cached features take seconds: it is saved once, below.
    # Evaluation (features, validation, the report) in bfloat16 where this CPU computes it natively.
    with bf16_evaluation(device.type == "cpu"):
        history = fine_tune(net, select or data, strategy=strategy, epochs=settings["epochs"], lr=settings["lr"],
                            batchnorm=settings["batchnorm"], augment=settings["augment"], device=device,
                            progress=progress, seed=seed,
                            checkpoint=Checkpoint(checkpoint, extra=extra) if checkpoint is not None else None,
                            resume=checkpoint if saved is not None else None)
        selected_on = history.selected_on or selected_on
        if select is None and history.selected_on == HELD_OUT:  # auto carved its own hold-out
            select = selection_split(data, seed=seed)[0]
        seconds = time.perf_counter() - start
        tuned = len(history) - history.probe_epochs  # epochs that ran images through the whole network
        if checkpoint is not None:
            with _shielded():
                _save_run(checkpoint, net=net, history=history, fine_tuned=tuned > 0,
                          extra={**extra, "finished": not history.halted, "stop_reason": history.stop_reason,
                                 "tta": history.tta})  # d2lft predict averages the views the run chose
        net.tta = history.tta  # the report is of the model as it will predict
        validation = _validate(net, data, data_dir, device) if len(history) else {}
    tuned_seconds = sum(history.seconds[history.probe_epochs:])
    return {
        # of the model handed back, on val/; None: stopped before the first epoch ended
        "val_acc": validation.get("val_acc"),
        "per_class_recall": validation.get("per_class_recall"),  # {class: fraction of its val/ images found}
        "confusion_matrix": validation.get("confusion_matrix"),  # [true class][predicted class], in `classes` order
        "misclassified": validation.get("misclassified"),  # val/ images, the most confident mistakes first
        # the best accuracy any epoch measured on what the run chose on (val/, or the hold-out)
        "best_val_acc": max((a for a in history.val_acc if a is not None and math.isfinite(a)), default=None),
        "selected_on": selected_on,
        "domain_shift": None if history.domain_shift is None else round(history.domain_shift, 3),
        "decision": history.decision,
        "kept": history.kept,
        "tta": history.tta,  # test-time augmentation chosen where the epoch was ({"flip", "rotate"}), or None
        "epochs": tuned,  # of training the backbone too (0 for a probe)
        "probe_epochs": history.probe_epochs,  # of training the head alone, on cached features
        "stop_reason": history.stop_reason,  # None for a run that did all its epochs
        "stop_message": history.stop_message,
        "interrupted": history.interrupted,
        "halted": history.halted,
        "train_seconds": round(seconds, 2),  # of this process: loading and training, not the final validation
        "resumed_from_epoch": saved.get("epoch") if saved is not None else None,
        # training images per second of the epochs that trained the backbone (None for a probe)
        "images_per_second": (round(len(data.train_dataset) * tuned / tuned_seconds, 2)
                              if tuned and tuned_seconds > 0 else None),
        "skipped": [os.fsdecode(p).encode("utf-8", "backslashreplace").decode() for p in data.skipped],
        "model": model,
        "strategy": strategy,
        "image_size": image_size,
        "batch_size": settings["batch_size"],
        "lr": settings["lr"],
        # the training augmentation of the epochs that trained the backbone (None: a probe alone ran)
        "augment": None if not tuned else settings["augment"] or (AUTO_AUGMENT if strategy == "auto"
                                                                 else data.augment),
        "batchnorm": settings["batchnorm"],
        "val_split": val_split,
        "seed": seed,
        "classes": data.classes,
        "train_images": len(data.train_dataset) - (len(select.val_dataset) if select is not None else 0),
        "holdout_images": len(select.val_dataset) if select is not None else 0,
        "val_images": len(data.val_dataset),
    }


def auto_image_size(data_dir: str | Path, model_size: int, *, val_split: float | None = None) -> int:
    """The model's image size, or twice the training images' typical shorter side when that is smaller.

    Upscaling small images helps a network pretrained on 224 px photos, up to a point: EuroSAT's
    64 px tiles, lp-ft with Lite0 on this 2-core CPU (seed 0, one run each): 0.954 at 96 px (10
    epochs), 0.962 at 128 px (8 epochs), 0.962 at 160 px (6 epochs, 1.6x the time per epoch).
    """
    from d2lft.images import typical_size

    folder = Path(data_dir) if val_split is not None else Path(data_dir) / "train"
    side = typical_size(folder) if folder.is_dir() else None
    return model_size if side is None else max(32, min(model_size, 2 * side))


def _validate(net, data, data_dir: str | Path, device) -> dict:
    """Accuracy, recall per class, confusion matrix and the misclassified files of `net` on val/ (one pass)."""
    from d2lft.images import printable_path
    from d2lft.inference import as_it_predicts
    from d2lft.metrics import accuracy, confusion_matrix, per_class_recall
    from d2lft.train import predict

    probs, targets = predict(as_it_predicts(net), data.val, device=device)
    predicted, classes = probs.argmax(1), data.classes
    recall = per_class_recall(targets, predicted, len(classes)).tolist()
    wrong = [{"path": printable_path(os.path.relpath(path, data_dir)), "true": classes[int(targets[i])],
              "predicted": classes[int(predicted[i])], "probability": round(float(probs[i, predicted[i]]), 4)}
             for i, (path, _) in enumerate(data.val_dataset.samples) if predicted[i] != targets[i]]
    return {
        "val_acc": accuracy(targets, predicted),
        "per_class_recall": {c: None if math.isnan(r) else round(r, 4) for c, r in zip(classes, recall)},
        "confusion_matrix": confusion_matrix(targets, predicted, len(classes)).tolist(),
        "misclassified": sorted(wrong, key=lambda m: -m["probability"]),
    }


def _per_class_line(report: dict, json_path: Path | None) -> str:
    """One line: recall per class on val/ (the five lowest when there are many classes), and the mistakes."""
    counts = {c: sum(row) for c, row in zip(report["classes"], report["confusion_matrix"])}
    found = {c: row[i] for i, (c, row) in enumerate(zip(report["classes"], report["confusion_matrix"]))}
    shown = sorted(report["classes"], key=lambda c: found[c] / max(counts[c], 1))[:5] \
        if len(report["classes"]) > 10 else report["classes"]
    title = "lowest recall on val/" if len(shown) < len(report["classes"]) else "recall per class on val/"
    wrong = len(report["misclassified"])
    where = f"listed in {json_path}" if json_path is not None else "--json lists them"
    return (f"{title}: " + ", ".join(f"{c} {found[c] / max(counts[c], 1):.3f} ({found[c]}/{counts[c]})" for c in shown)
            + (f"; {wrong} misclassified ({where})" if wrong else "; none misclassified"))


def _settings(given: dict, saved: dict | None, checkpoint: Path | None) -> dict:
    """The run's settings: those given, else the resumed run's (a given one that differs is refused), else DEFAULTS."""
    if saved is None:
        return {k: DEFAULTS[k] if v is None else v for k, v in given.items()}
    before = saved["settings"]
    for key, value in given.items():
        if value is not None and value != before.get(key):
            flag = "--" + key.replace("_", "-")
            was = "its default" if before.get(key) is None else f"{flag} {before.get(key)}"
            raise ConfigError(f"{checkpoint}: the run was started with {was}, not {flag} {value}; leave {flag} out "
                              "to resume it as it was set up, or drop --resume to start a new run")
    return {k: before.get(k, DEFAULTS[k]) for k in given}


def _resumable(checkpoint: Path | None) -> dict:
    """What a ``d2lft finetune`` run saved in `checkpoint` (extra and epoch), or one line on why it cannot resume."""
    from d2lft.checkpoint import CheckpointError, _read

    if checkpoint is None:
        raise ConfigError("--resume continues the run saved with --checkpoint PATH: give that --checkpoint")
    if not Path(checkpoint).is_file():
        raise CheckpointError(f"{checkpoint}: no such checkpoint to resume; check the path, or drop --resume to "
                              "start a new run (it writes the checkpoint)")
    data = _read(Path(checkpoint))
    extra = data.get("extra") if isinstance(data.get("extra"), dict) else {}
    if not isinstance(extra.get("settings"), dict) or not extra.get("classes"):
        raise CheckpointError(f"{checkpoint}: not a run of d2lft finetune that can resume (it records no settings); "
                              "drop --resume to start a new run")
    if extra.get("stop_reason") == "non_finite_loss":
        raise CheckpointError(f"{checkpoint}: that run stopped on a non-finite loss, and resuming would repeat it; "
                              "start a new run without --resume, with a lower --lr")
    if data.get("epoch") is None or data.get("optimizer") is None:
        raise CheckpointError(f"{checkpoint}: it holds no epoch of training the backbone to continue from (a probe, "
                              "whose epochs on cached features take seconds, or a run stopped before its first such "
                              "epoch ended); run again without --resume")
    if extra.get("finished"):
        raise CheckpointError(f"{checkpoint}: that run finished, so there is nothing to resume; use it (d2lft predict "
                              "--checkpoint), or drop --resume to train again")
    return {**extra, "epoch": int(data["epoch"])}


def _check_same_data(saved: dict, data, checkpoint: Path) -> None:
    if saved["classes"] != data.classes or saved.get("train_images") != len(data.train_dataset):
        raise ConfigError(f"{checkpoint}: the run trained on {saved.get('train_images')} images of the classes "
                          f"{saved['classes']}, but {data.root} holds {len(data.train_dataset)} images of "
                          f"{data.classes}; resume on the same data, or drop --resume to start a new run")


def _save_run(path: Path, *, net, history, extra: dict, fine_tuned: bool) -> None:
    """Write the model handed back, with what it is (`extra`), to the checkpoint `fit` kept after every epoch.

    `fit` wrote the run's last epoch there (what `--resume` continues from); the weights handed back
    (the best epoch's, or lp-ft's probe) become its best weights, which ``d2lft predict`` loads.
    A run that trained no epoch of the backbone (a probe) has no such file: it is written whole.
    """
    from d2lft.checkpoint import _read, _write, save_checkpoint
    from d2lft.distributed import is_main_process

    if not fine_tuned:
        save_checkpoint(path, net=net, history=history, extra=extra)
        return
    if not is_main_process():
        return
    run = _read(Path(path))
    handed = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    same = handed.keys() == run["model"].keys() and all(torch.equal(v, run["model"][k]) for k, v in handed.items())
    _write(Path(path), {**run, "best_model": None if same else handed, "extra": extra})


@contextmanager
def _shielded():
    """Let the final writes finish even when Ctrl-C comes again (the run is already over)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals cannot be changed, nothing to shield
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_outputs(*paths: Path | None) -> None:
    """Refuse output paths that cannot be written before any work starts (one line each)."""
    given = [p for p in paths if p is not None]
    if len({os.path.abspath(p) for p in given}) < len(given):
        raise ConfigError(f"--json and --checkpoint name the same file {given[0]}: give each its own path")
    for path in given:
        parent = path.parent if str(path.parent) else Path(".")
        if path.is_dir():
            raise ConfigError(f"{path} is a folder: give a file name for the output, e.g. {path / 'out.json'}")
        existing = parent
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"cannot write {path}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK):
            raise ConfigError(f"cannot write {path}: the folder {existing} is not writable")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1 (e.g. 0.2), got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    from d2lft.models import list_models
    from d2lft.recipes import BATCHNORM, STRATEGIES
    from d2lft.transforms import AUGMENT_PRESETS

    parser = argparse.ArgumentParser(prog="d2lft", description="Fine-tune pretrained vision models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ft = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained model on an image folder",
        description="Fine-tune a pretrained model on DATA_DIR, which holds train/ and val/ (or test/) class folders.",
    )
    ft.add_argument("data_dir", metavar="DATA_DIR", type=Path)
    ft.add_argument("--model", default=None, choices=list_models(), metavar="NAME",
                    help=f"backbone (default {DEFAULTS['model']}; one of: {', '.join(list_models())})")
    ft.add_argument("--strategy", default=None, choices=STRATEGIES,
                    help=f"default {DEFAULTS['strategy']}: a probe for images like ImageNet's, lp-ft "
                         "(chosen on a hold-out of train/) for images far from them")
    ft.add_argument("--epochs", type=_positive_int, default=None,
                    help="epochs (default: 30 for probe, whose epochs on cached features take milliseconds; "
                         "8 of all layers for auto when it fine-tunes; else 3)")
    ft.add_argument("--image-size", type=_positive_int, default=DEFAULTS["image_size"],
                    help="default: the model's (224), or twice the images' shorter side when that is smaller")
    ft.add_argument("--batch-size", type=_positive_int, default=None,
                    help=f"default {DEFAULTS['batch_size']}")
    ft.add_argument("--lr", type=_positive_float, default=DEFAULTS["lr"],
                    help="backbone learning rate when it trains (default 1e-3 for lp-ft and auto; 5e-4 with a "
                         "10x faster head for finetune; 5e-4 for scratch)")
    ft.add_argument("--augment", default=DEFAULTS["augment"], choices=AUGMENT_PRESETS,
                    help="training augmentation: crop+flip for photos, overhead for satellite or microscope "
                         "images (flips, right-angle turns, no colour change), none (default: crop+flip; "
                         "overhead when auto fine-tunes images far from ImageNet's)")
    ft.add_argument("--batchnorm", default=DEFAULTS["batchnorm"], choices=BATCHNORM,
                    help="BatchNorm when the backbone trains: update its statistics, or keep the pretrained "
                         "ones frozen (default: frozen for lp-ft, update otherwise)")
    ft.add_argument("--val-split", type=_fraction, default=None, metavar="F",
                    help="hold out this fraction of each class of train/ for validation (when there is no val/)")
    ft.add_argument("--seed", type=int, default=None, help="default 0")
    ft.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available)")
    ft.add_argument("--checkpoint", type=Path, default=None,
                    help="save the run here (.pt) after every epoch of training the backbone, and the model handed "
                         "back at the end (d2lft predict and export read it)")
    ft.add_argument("--resume", action="store_true",
                    help="continue the interrupted run saved at --checkpoint from its last finished epoch, with its "
                         "settings (a setting given must match); a probe does not resume: it takes seconds")
    ft.add_argument("--json", type=Path, default=None,
                    help="write the figures here: val/ accuracy, recall per class, confusion matrix, and the "
                         "misclassified val/ files with their predicted class and its probability")

    pr = sub.add_parser("predict", help="labels for images: ImageNet's, or your classes with --checkpoint")
    pr.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    pr.add_argument("--model", default="efficientnet_lite0", choices=list_models(), metavar="NAME")
    pr.add_argument("--checkpoint", type=Path, default=None,
                    help="a model saved by d2lft finetune --checkpoint (its classes and preprocessing)")
    pr.add_argument("--topk", type=_positive_int, default=5)

    ex = sub.add_parser("export", help="save a fine-tuned checkpoint with torch.export, runnable without d2lft")
    ex.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="saved by d2lft finetune --checkpoint")
    ex.add_argument("--out", type=Path, required=True,
                    help="the file to write (.pt2; load it with torch.export.load(path).module())")

    data = sub.add_parser("data", help="list or download the registry's datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    data_sub.add_parser("list", help="list the datasets d2lft knows")
    dl = data_sub.add_parser("download", help="download, verify and extract a dataset into the data directory")
    dl.add_argument("name")
    dl.add_argument("--root", type=Path, default=None, help="data directory (default $D2LFT_DATA_DIR or ./data)")

    bench = sub.add_parser("bench", help="images/s of a plain PyTorch loop vs d2lft.fit, side by side; "
                           "or, with --to-accuracy, seconds to reach an accuracy")
    bench.add_argument("--model", default="efficientnet_lite0", choices=list_models(), metavar="NAME",
                       help="backbone (default efficientnet_lite0)")
    bench.add_argument("--image-size", type=_positive_int, default=224, help="default 224")
    bench.add_argument("--batch-size", type=_positive_int, default=None,
                       help="default 32 (with --to-accuracy: the tutorial's 4)")
    bench.add_argument("--steps", type=_positive_int, default=20, help="timed steps per contender (default 20)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    bench.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available)")
    bench.add_argument("--data", type=Path, default=None, help="image folder to read (default: the course dataset)")
    bench.add_argument("--json", type=Path, default=None, help="write the figures here")
    bench.add_argument("--to-accuracy", type=_positive_float, default=None, metavar="A",
                       help="instead: seconds for the PyTorch tutorial's recipe and for `d2lft finetune`'s "
                            "default to reach validation accuracy A (e.g. 0.9)")
    bench.add_argument("--max-epochs", type=_positive_int, default=25,
                       help="with --to-accuracy: the tutorial's epochs at most (default 25, as it trains)")
    bench.add_argument("--seed", type=int, default=0, help="with --to-accuracy (default 0)")
    return parser


def _finetune(args: argparse.Namespace) -> int:
    from d2lft import distributed
    from d2lft.device import keep_freed_memory, resolve_device

    _check_outputs(args.json, args.checkpoint)
    if args.strategy == "probe" and args.lr is not None:
        raise ConfigError("--lr is the backbone's learning rate and --strategy probe trains only the head; "
                          "drop --lr, or choose --strategy lp-ft or finetune")
    device = resolve_device(args.device)
    if distributed.launched():
        device = distributed.setup(device)  # torchrun: join the process group, one GPU per process
    if device.type == "cpu":
        keep_freed_memory()  # process-wide: glibc keeps a step's buffers for the next one (d2lft.device)
    report = run_finetune(
        args.data_dir,
        model=args.model,
        strategy=args.strategy,
        epochs=args.epochs,
        image_size=args.image_size,
        batch_size=args.batch_size,
        lr=args.lr,
        augment=args.augment,
        batchnorm=args.batchnorm,
        val_split=args.val_split,
        seed=args.seed,
        device=device,
        checkpoint=args.checkpoint,
        resume=args.resume,
    )
    if not distributed.is_main_process():  # under torchrun, rank 0 alone reports
        return 0
    if report["val_acc"] is not None:
        speed = f", {report['images_per_second']:.1f} images/s" if report["images_per_second"] else ""
        phases = " + ".join(f"{n} {what}" for n, what in ((report["probe_epochs"], "probe epochs on cached features"),
                                                          (report["epochs"], "epochs of the whole network")) if n)
        kept = f", kept the {report['kept']} phase" if report["strategy"] == "lp-ft" else ""
        if report["decision"]:
            print(f"chose {report['decision']}")
        print(f"val_acc {report['val_acc']:.3f} after {phases}{kept}, {report['train_seconds']:.1f} s{speed}; "
              f"chosen on {report['selected_on']}")
        print(_per_class_line(report, args.json))
    if report["skipped"]:
        print(f"skipped {len(report['skipped'])} file(s), unreadable or not an image type: " + ", ".join(report["skipped"]))
    if args.json:
        _write_json(args.json, report)
    if report["halted"]:  # the JSON and the checkpoint above still hold what was gathered
        kept = [str(p) for p in (args.json, args.checkpoint) if p is not None]
        print(f"d2lft finetune: stopped: {report['stop_message']}" + (f"; kept {', '.join(kept)}" if kept else ""),
              file=sys.stderr)
        return 130 if report["interrupted"] else 1
    return 0


def _predict(args: argparse.Namespace) -> int:
    from d2lft.images import printable_path
    from d2lft.inference import classify
    from d2lft.models import create_model

    if args.checkpoint is not None:
        from d2lft.checkpoint import load_finetuned

        net = load_finetuned(args.checkpoint)  # your classes, with the preprocessing saved at training time
    else:
        net = create_model(args.model)
    failed = 0
    for path, labels in zip(args.images, classify(net, args.images, topk=args.topk, return_errors=True)):
        if isinstance(labels, Exception):  # a bad or missing file: say which, and go on with the others
            print(f"d2lft predict: skipped {labels}", file=sys.stderr)
            failed += 1
            continue
        print(printable_path(path))
        for name, prob in labels:
            print(f"  {prob:6.1%}  {name}")
    return 1 if failed else 0


def _data(args: argparse.Namespace) -> int:
    from d2lft.datasets import get_dataset, list_datasets

    if args.data_command == "list":
        for info in list_datasets():
            print(f"{info.name:12s} {info.description}")
        return 0
    path = get_dataset(args.name, root=args.root, download=True)
    print(f"{args.name}: ready at {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from d2lft.bench import bench, format_report, format_time_to_accuracy, time_to_accuracy

    _check_outputs(args.json)
    if args.to_accuracy is not None:
        report = time_to_accuracy(args.to_accuracy, data=args.data, model=args.model, max_epochs=args.max_epochs,
                                  image_size=args.image_size, batch_size=args.batch_size or 4,
                                  device=args.device, seed=args.seed)
        print(format_time_to_accuracy(report))
        if args.json:
            _write_json(args.json, report)
        return 0
    report = bench(
        model=args.model,
        image_size=args.image_size,
        batch_size=args.batch_size or 32,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        data=args.data,
    )
    print(format_report(report))
    if args.json:
        _write_json(args.json, report)
    return 0


def _write_json(path: Path, report: dict) -> None:
    """Write the report atomically (a temporary file renamed over `path`), shielded from Ctrl-C."""
    text = json.dumps(report, indent=2) + "\n"
    with _shielded():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError as err:  # a full disk, a folder removed meanwhile: say it, print the report instead
            print(text, end="")
            raise ConfigError(f"cannot write {path} ({err.strerror}); the report is printed above") from None
    print(f"wrote {path}")


def _export(args: argparse.Namespace) -> int:
    from d2lft.checkpoint import load_finetuned
    from d2lft.inference import export

    _check_outputs(args.out)
    net = load_finetuned(args.checkpoint)
    with _shielded():
        export(net, args.out)
    print(f"wrote {args.out}: input (1, 3, {net.image_size}, {net.image_size}) normalised with mean {net.mean} "
          f"and std {net.std}; output logits for {net.categories}")
    if net.tta:  # the file holds one view's network; the run's figures averaged several
        print(f"note: the run predicted with test-time augmentation {net.tta} (d2lft.TTA); the exported network "
              "sees one view: average the softmax of the views yourself to predict as it validated")
    return 0


_COMMANDS = {"finetune": _finetune, "predict": _predict, "export": _export, "data": _data, "bench": _bench}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    >>> main(["data", "list"])  # doctest: +ELLIPSIS
    hotdog ...
    0
    """
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except D2LFTError as err:
        print(f"d2lft {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside training (loading, caching): nothing to keep yet
        print(f"d2lft {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
