"""Do better ImageNet models transfer better? The four offline backbones, measured on this CPU.

Per backbone: parameter count (the published 1000-class model), inference images/s at its own
resolution and at 224 px (batch 32, eval, no grad, the same run side by side), its published
ImageNet top-1, and linear-probe validation accuracy on ants/bees and EuroSAT (224 px, the
64 px tiles upsampled) for several seeds. The probe is the one of ``d2lft.fine_tune(...,
strategy="probe")``: features of the frozen backbone cached once per dataset (evaluation
transform), then a fresh head trained for 30 epochs (AdamW, lr 3e-3, weight decay 1e-4, cosine);
the seeds change only the head's initialisation and the order of the cached batches.

    D2LFT_DATA_DIR=../shared/data python experiments/transfer.py speed
    D2LFT_DATA_DIR=../shared/data python experiments/transfer.py probe --models efficientnet_lite0 ...
    D2LFT_DATA_DIR=../shared/data python experiments/transfer.py finetune --seeds 3
    ... finetune --threads 1 --first-seed 1 --seeds 2 & ... --first-seed 2 --seeds 3  # side by side

The finetune phase runs what ``ft.fine_tune``'s ``auto`` runs when it fine-tunes, for every
backbone on both datasets: lp-ft for ``AUTO_EPOCHS`` epochs at the image size ``d2lft finetune``
picks (``auto_image_size``: the model's own, or twice a small image's side), the epoch and the phase
chosen on a hold-out of 20 % of each class of train/ (``selection_split``), val/ evaluated once at
the end; augmentation "overhead" for the tiles and "crop+flip" for the photos. Beside it, on the same
images and size, the probe of ``auto``'s other branch (30 epochs on cached features, last epoch).

Each phase updates experiments/transfer.json in place (one backbone at a time), so a long run
can be split. Timings on a shared machine are noisy: the speed phase times all backbones in
one process, interleaved over several rounds, and keeps the median; compare within one run only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import d2lft as ft
from d2lft.bench import inference_speed
from d2lft.device import set_seed
from d2lft.recipes import AUTO_EPOCHS, selection_split

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v2")
DATASETS = ("hymenoptera_data", "eurosat_small")
PROBE = {"epochs": 30, "lr": 3e-3, "weight_decay": 1e-4, "batch_size": 64}  # d2lft.fine_tune's probe


def speed(models: list[str], *, rounds: int) -> dict[str, dict]:
    """Parameters and inference images/s (`d2lft.bench.inference_speed`: the nets take turns, median over
    `rounds`) at each net's own size and at 224 px."""
    nets = {name: ft.create_model(name) for name in models}
    native = inference_speed(nets, rounds=rounds, device="cpu")
    at_224 = inference_speed(nets, image_size=224, rounds=rounds, device="cpu")
    return {
        name: {
            "imagenet_top1": net.meta["imagenet_top1"],
            "params": sum(p.numel() for p in net.parameters()),
            "image_size": net.image_size,
            "images_per_s_native": native[name],
            "images_per_s_224": at_224[name],
        }
        for name, net in nets.items()
    }


def probe_accuracies(net: ft.Net, root: Path, *, seeds: list[int], image_size: int) -> tuple[list[float], float]:
    """Final validation accuracy of a linear probe per seed, and the seconds spent caching features."""
    data = ft.image_folders(root, net, image_size=image_size, batch_size=32, progress=False)
    start = time.perf_counter()
    loaders = ft.feature_loaders(net, data, batch_size=PROBE["batch_size"], progress=False)
    seconds = time.perf_counter() - start
    accs = []
    for seed in seeds:
        set_seed(seed)
        ft.replace_head(net, len(data.classes))  # Xavier weight, zero bias
        loaders[0].generator.manual_seed(seed)
        history = ft.probe(net, data, epochs=PROBE["epochs"], lr=PROBE["lr"], weight_decay=PROBE["weight_decay"],
                           seed=seed, device="cpu", loaders=loaders)
        accs.append(history.val_acc[-1])
    return accs, seconds


def finetune_run(name: str, root: Path, *, seed: int, augment: str) -> dict:
    """One backbone, one dataset, one seed: the probe and lp-ft of ``auto``, val/ reported once each."""
    from d2lft.cli import auto_image_size

    set_seed(seed)
    net = ft.create_model(name)
    size = auto_image_size(root, net.image_size)
    data = ft.image_folders(root, net, image_size=size, batch_size=32, progress=False)
    start = time.perf_counter()
    probe = ft.create_model(name, num_classes=len(data.classes))
    ft.fine_tune(probe, data, strategy="probe", best=None, seed=seed, progress=False, device="cpu")
    probe_acc = ft.evaluate(probe, data.val, device="cpu")["acc"]
    probe_seconds = time.perf_counter() - start
    ft.replace_head(net, len(data.classes))
    start = time.perf_counter()
    select, where = selection_split(data.with_augment(augment), seed=seed)
    history = ft.fine_tune(net, select, strategy="lp-ft", epochs=AUTO_EPOCHS, seed=seed, progress=False,
                           device="cpu")
    acc = ft.evaluate(net, data.val, device="cpu")["acc"]
    return {"seed": seed, "image_size": size, "augment": augment, "probe_acc": probe_acc,
            "probe_seconds": probe_seconds, "lpft_acc": acc, "lpft_seconds": time.perf_counter() - start,
            "kept": history.kept, "selected_on": where}


def _save(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}", flush=True)


def _add_run(path: Path, name: str, dataset: str, run: dict) -> None:
    """Add one fine-tune run to the json as it is on disk now, under a lock, so that processes
    running other seeds at the same time keep each other's runs."""
    import fcntl

    with open(path) as lock:  # the file itself is the lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        report = json.loads(path.read_text())
        done = report.setdefault("finetune", {}).setdefault(name, {}).setdefault(dataset, [])
        done[:] = sorted([r for r in done if r["seed"] != run["seed"]] + [run], key=lambda r: r["seed"])
        _save(path, report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("speed", "probe", "finetune"))
    parser.add_argument("--models", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("transfer.json"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="(finetune) run seeds first-seed .. seeds-1: one process per seed can share the json")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS, help="(finetune)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (speed)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = Path(os.environ.get("D2LFT_DATA_DIR", "data"))
    report = json.loads(args.json.read_text()) if args.json.is_file() else {"speed": {}, "probe": {}}
    report["machine"] = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    if args.phase == "speed":
        report["speed"] = speed(args.models, rounds=args.rounds)
        report["speed_settings"] = (f"batch 32 random images, eval, no grad; per round 1 warm-up + 2 timed batches "
                                    f"per model and size; median of {args.rounds} interleaved rounds; "
                                    f"{args.threads} threads, {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}; "
                                    "compare the models within this run, not with another machine or day")
        _save(args.json, report)
        return
    seeds = list(range(args.seeds))
    if args.phase == "finetune":
        runs = report.setdefault("finetune", {})
        for seed in range(args.first_seed, args.seeds):  # every backbone's first seed, then the next
            for name in args.models:
                for dataset, augment in zip(DATASETS, ("crop+flip", "overhead")):
                    if dataset not in args.datasets:
                        continue
                    done = runs.setdefault(name, {}).setdefault(dataset, [])
                    if any(r["seed"] == seed for r in done):
                        continue
                    run = finetune_run(name, data_dir / dataset, seed=seed, augment=augment)
                    print(name, dataset, json.dumps(run), flush=True)
                    _add_run(args.json, name, dataset, run)
        return
    report["probe_settings"] = {**PROBE, "seeds": seeds, "image_size": 224, "metric": "val_acc after the last epoch"}
    for name in args.models:
        net = ft.create_model(name)
        row = {}
        for dataset in DATASETS:
            accs, seconds = probe_accuracies(net, data_dir / dataset, seeds=seeds, image_size=224)
            row[dataset] = {"val_acc": accs, "mean": statistics.mean(accs), "sd": statistics.stdev(accs),
                            "feature_seconds": seconds, "threads": args.threads}
        report["probe"][name] = row
        print(name, json.dumps(row), flush=True)
        _save(args.json, report)


if __name__ == "__main__":
    main()
