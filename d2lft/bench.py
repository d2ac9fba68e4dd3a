"""Images per second of a plain PyTorch loop and of `d2lft.fit`, side by side in one process.

Each contender trains the same model on the same images with the same batch size, image size and
optimizer. A step is timed from one batch request to the next, so data loading counts; the
figure is the median over the timed steps after a few warm-up steps.
"""
from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from d2lft.errors import ConfigError

__all__ = ["bench", "format_report", "format_time_to_accuracy", "inference_speed", "plain_loop",
           "time_to_accuracy", "TimedLoader", "tutorial_recipe"]


class TimedLoader:
    """Wraps a DataLoader: yields `limit` batches, going on into its next epoch when one runs out, and records
    when each was asked for (so a small folder still gives as many timed steps as asked).

    >>> loader = TimedLoader([(torch.zeros(2, 3), torch.zeros(2))] * 3, limit=5)
    >>> len(loader), len(list(loader)), len(loader.step_seconds())
    (5, 5, 4)
    """

    def __init__(self, loader, *, limit: int) -> None:
        self.loader = loader
        self.limit = limit
        self.stamps: list[float] = []
        self.batch_sizes: list[int] = []

    def __len__(self) -> int:
        return self.limit

    def __iter__(self) -> Iterator:
        self.stamps = []
        self.batch_sizes = []
        while len(self.batch_sizes) < self.limit:
            before = len(self.batch_sizes)
            for batch in self.loader:  # one epoch (a DataLoader shuffles again for the next)
                if len(self.batch_sizes) == self.limit:
                    break
                self.stamps.append(time.perf_counter())
                self.batch_sizes.append(len(batch[1]))
                yield batch
            if len(self.batch_sizes) == before:
                raise ConfigError("bench: the loader yielded no batches; use more images or a smaller batch")
        self.stamps.append(time.perf_counter())  # the end of the last step

    def step_seconds(self) -> list[float]:
        """Seconds per step: from one batch arriving to the next (compute + loading the next batch)."""
        return [b - a for a, b in zip(self.stamps[1:-1], self.stamps[2:])]


def plain_loop(net: nn.Module, loader, *, device: torch.device, lr: float = 1e-3) -> None:
    """The loop a learner writes by hand: one epoch of forward, loss, backward, step."""
    net.to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        loss = loss_fn(net(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def _images_per_second(timed: TimedLoader, warmup: int) -> tuple[dict[str, float], int]:
    """Images/s of the slowest, the median and the fastest step after `warmup`, and how many steps that is."""
    steps = timed.step_seconds()[max(warmup, 0):]  # step_seconds()[i] is step i + 1: drop the warm-up steps
    if not steps:
        raise ConfigError("bench: no timed steps; use more steps or fewer warm-up steps")
    size = timed.batch_sizes[0]
    return {"min": size / max(steps), "median": size / statistics.median(steps), "max": size / min(steps)}, len(steps)


def _plain_loader(checked, *, image_size: int, batch_size: int, mean, std, train: bool = True) -> DataLoader:
    """torchvision's ImageFolder loading and PIL transforms: every epoch decodes every JPEG again.

    ``checked`` is the train dataset of ``image_folders(..., cache=False)``: an ImageFolder over the files
    finetune's rules accept (bad images, hidden folders and link loops already left out), so every contender
    trains on the same files and none ends in a traceback on a file finetune skips.
    """
    from torchvision import datasets
    from torchvision.transforms import v2

    # The tutorial's transforms: a random crop and flip to train, resize to 256/224 of the size and
    # take the centre to validate.
    view = ([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()] if train
            else [v2.Resize(round(image_size * 256 / 224), antialias=True), v2.CenterCrop(image_size)])
    transform = v2.Compose([*view, v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    dataset = copy.copy(checked)  # shallow: the same file list, the plain loader and transform
    dataset.loader, dataset.transform = datasets.folder.default_loader, transform
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train)


@torch.no_grad()
def inference_speed(nets: dict[str, nn.Module], *, image_size: int | None = None, batch_size: int = 32,
                    batches: int = 2, rounds: int = 3, device: str | torch.device | None = None) -> dict[str, float]:
    """Inference images/s of each net (eval mode, no grad), median over `rounds` interleaved rounds.

    The nets take turns within each round, so a burst of load on a shared machine slows them all
    alike: compare the figures of one call, not of two. Each round runs one untimed batch, then
    `batches` timed ones, of random images at `image_size` px (default: each net's own size).

    >>> from d2lft.models import create_model
    >>> speeds = inference_speed({"lite0": create_model("efficientnet_lite0", pretrained=False)},
    ...                          image_size=32, batch_size=2, batches=1, rounds=1)
    >>> list(speeds), speeds["lite0"] > 0
    (['lite0'], True)
    """
    from d2lft.device import resolve_device

    if rounds < 1 or batches < 1:
        raise ConfigError(f"inference_speed: rounds={rounds}, batches={batches}; both must be at least 1")
    device = resolve_device(device)
    runs: dict[str, list[float]] = {name: [] for name in nets}
    for _ in range(rounds):
        for name, net in nets.items():
            net.eval().to(device)
            size = image_size or getattr(net, "image_size", 224)
            x = torch.randn(batch_size, 3, size, size, device=device)
            net(x)  # warm-up: allocations, kernel selection
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(batches):
                net(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            runs[name].append(batch_size * batches / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in runs.items()}


def bench(
    *,
    model: str = "efficientnet_lite0",
    image_size: int = 224,
    batch_size: int = 32,
    steps: int = 20,
    warmup: int = 2,
    device: str | torch.device | None = None,
    data: str | Path | None = None,
    contenders: tuple[str, ...] = ("plain", "fit_plain", "fit"),
) -> dict:
    """Train the same model with each contender and return their images/s and ratios.

    Contenders: ``plain`` (hand-written loop, ImageFolder decoding JPEGs every step), ``fit_plain``
    (`d2lft.fit` with its fast path off: the same uncached loader, no channels_last, the default
    allocator) and ``fit`` (`d2lft.fit` with its defaults on `d2lft.image_folders`' cached tensors).
    They run in this order: ``fit`` turns on the process-wide allocator setting of the command
    line (`d2lft.device.keep_freed_memory`), so the contenders before it run without it.

    >>> report = bench(model="efficientnet_lite0", image_size=32, batch_size=4, steps=2, warmup=1,
    ...                contenders=("plain", "fit"))  # doctest: +SKIP
    """
    from d2lft.data import BadImageWarning, image_folders
    from d2lft.datasets import course_dataset
    from d2lft.device import keep_freed_memory, resolve_device
    from d2lft.models import create_model
    from d2lft.train import fit

    device = resolve_device(device)
    root = Path(data) if data is not None else course_dataset(verbose=False)
    limit = warmup + steps + 1
    results: dict[str, float] = {}
    timed_steps: dict[str, int] = {}
    spread: dict[str, dict[str, float]] = {}
    setup_seconds: dict[str, float] = {}
    order = ("plain", "fit_plain", "fit")
    unknown = [name for name in contenders if name not in order]
    if unknown:
        raise ConfigError(f"bench: unknown contender {unknown[0]!r}; expected plain, fit_plain or fit")
    reference = create_model(model, pretrained=False)  # for its preprocessing
    # The folder is checked once, with finetune's rules; bad files are reported here and skipped by all.
    checked = image_folders(root, reference, image_size=image_size, batch_size=batch_size, cache=False,
                            progress=False)
    for name in sorted(contenders, key=order.index):  # fit last: its allocator setting is process-wide
        torch.manual_seed(0)
        t0 = time.perf_counter()
        if name == "fit":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", BadImageWarning)  # the same files, already reported above
                folders = image_folders(root, reference, image_size=image_size, batch_size=batch_size, cache=True)
            loader, classes = folders.train, folders.classes
        else:
            loader = _plain_loader(checked.train_dataset, image_size=image_size, batch_size=batch_size,
                                   mean=reference.mean, std=reference.std)
            classes = checked.classes
        net = create_model(model, num_classes=len(classes))
        setup_seconds[name] = time.perf_counter() - t0
        timed = TimedLoader(loader, limit=limit)
        if name == "plain":
            plain_loop(net, timed, device=device)
        elif name == "fit_plain":
            fit(net, timed, epochs=1, device=device, progress=False, amp=False, channels_last=False, best=None)
        else:
            if device.type == "cpu":
                keep_freed_memory()  # what the command line does for a CPU run
            fit(net, timed, epochs=1, device=device, progress=False, best=None)
        spread[name], timed_steps[name] = _images_per_second(timed, warmup)
        results[name] = spread[name]["median"]
    # The same model's inference on batches of the same shape, in the same process: what one trained
    # image costs in forward passes (about 3 in FLOPs: a forward and a backward twice its size).
    inference = inference_speed({model: net}, image_size=image_size, batch_size=batch_size,
                                batches=max(2, steps // 2), device=device)[model]
    report = {
        "model": model,
        "device": str(device),
        "image_size": image_size,
        "batch_size": batch_size,
        "steps": steps,
        "timed_steps": timed_steps,  # `steps`: a small folder is read for more than one epoch
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "data": str(root),
        "skipped": list(checked.skipped),  # files no contender used (unreadable, or not an image type)
        "images_per_second": results,  # the median step's
        "images_per_second_spread": spread,  # of the slowest, the median and the fastest step
        "setup_seconds": setup_seconds,
        "inference_images_per_second": inference,
        "forward_passes_per_trained_image": {k: inference / v for k, v in results.items()},
    }
    if "plain" in results:
        report["ratio_vs_plain"] = {k: v / results["plain"] for k, v in results.items() if k != "plain"}
    return report


def tutorial_recipe(net: nn.Module, train_loader, val_loader, *, epochs: int = 25, target: float | None = None,
                    device: torch.device, clock=time.perf_counter) -> list[dict]:
    """The PyTorch transfer-learning tutorial's fine-tuning, epoch by epoch, as people copy it.

    Every layer trains with SGD (lr 0.001, momentum 0.9), the learning rate divided by 10 every 7
    epochs, cross-entropy; after each epoch, accuracy on `val_loader`. Stops after the first epoch
    that reaches `target`. Returns one row per epoch: epoch, seconds since the call, val_acc.
    """
    start = clock()
    net.to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    loss_fn = nn.CrossEntropyLoss()
    rows = []
    for epoch in range(1, epochs + 1):
        net.train()
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss_fn(net(images), labels).backward()
            optimizer.step()
        scheduler.step()
        net.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in val_loader:
                correct += (net(images.to(device)).argmax(1) == labels.to(device)).sum().item()
        rows.append({"epoch": epoch, "seconds": clock() - start, "val_acc": correct / len(val_loader.dataset)})
        if target is not None and rows[-1]["val_acc"] >= target:
            break
    return rows


def time_to_accuracy(
    target: float,
    *,
    data: str | Path | None = None,
    model: str = "efficientnet_lite0",
    max_epochs: int = 25,
    image_size: int = 224,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    seed: int = 0,
    contenders: tuple[str, ...] = ("tutorial", "default"),
) -> dict:
    """Seconds each contender takes to reach `target` accuracy on val/, side by side in one process.

    ``tutorial``: the PyTorch tutorial's recipe (`tutorial_recipe`: ImageFolder decoding every JPEG,
    batches of `batch_size` at `image_size` px, up to `max_epochs`), stopped after the first epoch
    that reaches `target`; its seconds count from building the model (and checking the folder with
    finetune's rules) to that epoch's validation.
    ``default``: ``d2lft finetune DATA`` with every default (`d2lft.cli.run_finetune`), which
    chooses its own recipe and size; its seconds are the whole call's, loading and the final
    validation included. Both start from the same pretrained `model`.

    >>> report = time_to_accuracy(0.9, data="hymenoptera_data", max_epochs=25)  # doctest: +SKIP
    >>> report["speedup"]  # the tutorial's seconds / the default's, when both reach the target  # doctest: +SKIP
    """
    from d2lft.cli import run_finetune
    from d2lft.data import image_folders
    from d2lft.datasets import course_dataset
    from d2lft.device import resolve_device, set_seed
    from d2lft.models import create_model, replace_head

    if not 0 < target <= 1:
        raise ConfigError(f"bench: --to-accuracy {target}; expected a validation accuracy in (0, 1]")
    if max_epochs < 1:
        raise ConfigError(f"bench: --max-epochs {max_epochs}; expected at least 1")
    unknown = [name for name in contenders if name not in ("tutorial", "default")]
    if unknown:
        raise ConfigError(f"bench: unknown contender {unknown[0]!r}; expected tutorial or default")
    device = resolve_device(device)
    root = Path(data) if data is not None else course_dataset(verbose=False)
    results: dict[str, dict] = {}
    for name in contenders:
        set_seed(seed)
        start = time.perf_counter()
        if name == "tutorial":
            net = create_model(model)
            # The folder checked once with finetune's rules, so both contenders train on the same files.
            checked = image_folders(root, net, image_size=image_size, batch_size=batch_size, cache=False,
                                    progress=False)
            replace_head(net, len(checked.classes))
            loaders = [_plain_loader(dataset, image_size=image_size, batch_size=batch_size, mean=net.mean,
                                     std=net.std, train=train)
                       for dataset, train in ((checked.train_dataset, True), (checked.val_dataset, False))]
            rows = tutorial_recipe(net, *loaders, epochs=max_epochs, target=target, device=device,
                                   clock=lambda: time.perf_counter() - start)
            final = rows[-1]
            results[name] = {"val_acc": final["val_acc"], "seconds": final["seconds"], "epochs": final["epoch"],
                             "curve": rows, "image_size": image_size, "batch_size": batch_size}
        else:
            report = run_finetune(root, model=model, seed=seed, device=device, progress=False)
            results[name] = {"val_acc": report["val_acc"], "seconds": time.perf_counter() - start,
                             "epochs": report["epochs"] + report["probe_epochs"], "strategy": report["kept"],
                             "image_size": report["image_size"], "batch_size": report["batch_size"]}
        results[name]["reached"] = results[name]["val_acc"] is not None and results[name]["val_acc"] >= target
    report = {"target": target, "model": model, "device": str(device), "threads": torch.get_num_threads(),
              "data": str(root), "seed": seed, "max_epochs": max_epochs, "contenders": results}
    if all(name in results and results[name]["reached"] for name in ("tutorial", "default")):
        report["speedup"] = results["tutorial"]["seconds"] / results["default"]["seconds"]
    return report


def format_time_to_accuracy(report: dict) -> str:
    """A small table of a `time_to_accuracy` report, for the terminal."""
    lines = [f"time to {report['target']:.3f} validation accuracy, {report['model']} on {report['device']}, "
             f"{report['threads']} threads, seed {report['seed']}",
             f"{'contender':<10} {'reached':>7} {'val_acc':>8} {'seconds':>8} {'epochs':>6}  recipe"]
    for name, r in report["contenders"].items():
        recipe = (f"SGD, every layer, {r['image_size']} px, batch {r['batch_size']}" if name == "tutorial"
                  else f"d2lft finetune: {r['strategy']}, {r['image_size']} px")
        lines.append(f"{name:<10} {'yes' if r['reached'] else 'no':>7} {r['val_acc'] or float('nan'):8.3f} "
                     f"{r['seconds']:8.1f} {r['epochs']:6d}  {recipe}")
    if "speedup" in report:
        lines.append(f"the default reached it {report['speedup']:.1f}x sooner")
    elif "tutorial" in report["contenders"] and not report["contenders"]["tutorial"]["reached"]:
        lines.append(f"the tutorial's recipe did not reach it in {report['max_epochs']} epochs")
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """A small table of a `bench` report, for the terminal."""
    lines = [
        f"{report['model']} on {report['device']}, {report['image_size']} px, batch {report['batch_size']}, "
        f"{report['threads']} threads; images/s of the median step of {min(report['timed_steps'].values())} "
        f"after {report['warmup']} warm-up (slowest and fastest step)",
        f"{'contender':<10} {'images/s':>9} {'(min - max)':>13} {'vs plain':>9} {'setup s':>8}",
    ]
    if report.get("skipped"):
        lines.append(f"skipped {len(report['skipped'])} file(s) in {report['data']} (see the warnings): "
                     + ", ".join(report["skipped"]))
    ratios = report.get("ratio_vs_plain", {})
    for name, ips in report["images_per_second"].items():
        ratio = f"{ratios[name]:.2f}x" if name in ratios else "1.00x" if name == "plain" else "-"
        low, high = report["images_per_second_spread"][name]["min"], report["images_per_second_spread"][name]["max"]
        lines.append(f"{name:<10} {ips:9.1f} {f'({low:.1f} - {high:.1f})':>13} {ratio:>9} "
                     f"{report['setup_seconds'][name]:8.1f}")
    if "inference_images_per_second" in report:
        passes = report["forward_passes_per_trained_image"]
        lines.append(f"inference {report['inference_images_per_second']:10.1f} images/s (eval, no grad): a trained "
                     "image costs " + ", ".join(f"{v:.1f} ({k})" for k, v in passes.items()) + " forward passes")
    return "\n".join(lines)
