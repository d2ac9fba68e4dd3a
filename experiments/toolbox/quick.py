"""The fine-tuning toolbox on cached features: a quick, CPU-sized look, not a benchmark.

Lite0's frozen features of the course dataset (`d2lft.course_dataset`: the ants/bees photos
under ``$D2LFT_DATA_DIR``, else the generated shapes) at a small image size, cached once. On
them, `INGREDIENTS` linear heads start from the same initial head and differ in the order of
their batches (the seed), each with an `EMA`:

* each head's val accuracy, its EMA's, the uniform soup's and the greedy soup's (chosen on a
  hold-out of 20 % of train/, never on val/);
* the calibration of the first head on val: ECE before and after a temperature fitted on the
  hold-out's logits;
* test-time augmentation (flips) of the whole net (backbone + first head) on the val images:
  accuracy and how many predictions it turns right -> wrong and wrong -> right.

    D2LFT_DATA_DIR=../shared/data python experiments/toolbox/quick.py [--image-size 128] [--epochs 15]

One run, one seed of everything: a figure for the shape of the effects, not for a chapter. The
numbers are printed and written to experiments/toolbox/quick.json.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import d2lft as ft
from d2lft.features import extract_features
from d2lft.metrics import prediction_changes

INGREDIENTS = 5


def _data(image_size: int) -> ft.ImageFolderData:
    net = ft.create_model("efficientnet_lite0", num_classes=2)
    root = ft.course_dataset(download=False)  # the photos when found, else the generated shapes (it says which)
    return ft.image_folders(root, net.preprocessing.with_size(image_size), progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)

    data = _data(args.image_size)
    inner = data.holdout(0.2)  # heads train on inner.train; the hold-out (inner.val) chooses; val/ reports
    net = ft.create_model("efficientnet_lite0", num_classes=len(data.classes))
    ft.freeze(net.backbone)
    cache = {name: extract_features(net, loader, progress=False) for name, loader in
             (("train", inner.loader("train")), ("holdout", inner.val), ("val", data.val))}
    holdout, val = (DataLoader(cache[k], batch_size=256) for k in ("holdout", "val"))

    start = copy.deepcopy(net.head)
    heads, emas = [], []
    for seed in range(INGREDIENTS):
        head, ema = copy.deepcopy(start), ft.EMA(decay=0.99)
        train = DataLoader(cache["train"], batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))
        ft.fit(head, train, epochs=args.epochs, lr=3e-3, weight_decay=1e-4, scheduler="cosine", best=None,
               callbacks=[ema], progress=False, seed=seed)
        heads.append(head)
        emas.append(ema.module)
    acc = lambda m, loader=val: ft.evaluate(m, loader)["acc"]  # noqa: E731
    greedy = ft.greedy_soup(heads, holdout)
    report: dict = {
        "dataset": str(data.root.name), "image_size": args.image_size, "epochs": args.epochs,
        "heads_val_acc": [acc(h) for h in heads], "ema_val_acc": [acc(e) for e in emas],
        "uniform_soup_val_acc": acc(ft.uniform_soup(heads)),
        "greedy_soup": {"ingredients": greedy.ingredients, "holdout_acc": greedy.score, "val_acc": acc(greedy.net)},
    }

    logits, y = ft.predict(heads[0], holdout, logits=True)
    t = ft.calibration.fit_temperature(logits, y)
    val_logits, val_y = ft.predict(heads[0], val, logits=True)
    report["calibration"] = {
        "temperature": t,
        "val_ece_before": ft.calibration.expected_calibration_error(val_y, val_logits.softmax(1)),
        "val_ece_after": ft.calibration.expected_calibration_error(val_y, (val_logits / t).softmax(1)),
    }

    net.head = heads[0]
    plain, targets = ft.predict(net, data.val)
    flipped, _ = ft.predict(ft.TTA(net), data.val)
    report["tta"] = {"val_acc_plain": ft.accuracy(targets, plain), "val_acc_tta": ft.accuracy(targets, flipped),
                     **prediction_changes(targets, plain, flipped)}
    text = json.dumps(report, indent=2)
    (Path(__file__).parent / "quick.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
