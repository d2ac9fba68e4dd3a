"""One fine-tuning run on the d2lft API with the settings issue 10 sweeps; appends a line to results.jsonl.

    python recipe.py eurosat_small --size 128 --augment overhead --lr 5e-4 --epochs 6 --seed 0

Whatever the run chooses (the best epoch, lp-ft's phase) it chooses on a hold-out carved from
train/ (--holdout, 0 for none); val/ is evaluated once, on the model handed back.
"""
import argparse, json, os, time
from pathlib import Path

import torch
import d2lft as ft
from d2lft.device import keep_freed_memory

p = argparse.ArgumentParser()
p.add_argument("data"); p.add_argument("--model", default="efficientnet_lite0")
p.add_argument("--strategy", default="lp-ft"); p.add_argument("--size", type=int, default=128)
p.add_argument("--augment", default="overhead"); p.add_argument("--batchnorm", default=None)
p.add_argument("--lr", type=float, default=None); p.add_argument("--head-lr-mult", type=float, default=None)
p.add_argument("--epochs", type=int, default=None); p.add_argument("--ls", type=float, default=None)
p.add_argument("--wd", type=float, default=1e-4); p.add_argument("--sched", default="warmup_cosine")
p.add_argument("--batch-size", type=int, default=32); p.add_argument("--holdout", type=float, default=0.2)
p.add_argument("--best", default="val_loss"); p.add_argument("--seed", type=int, default=0)
p.add_argument("--tag", default="")
a = p.parse_args()

keep_freed_memory()
root = Path(os.environ.get("D2LFT_DATA_DIR", "../shared/data")) / a.data
start = time.perf_counter()
ft.set_seed(a.seed)
net = ft.create_model(a.model)
data = ft.image_folders(root, net, image_size=a.size, batch_size=a.batch_size, augment=a.augment,
                        seed=a.seed, progress=False)
ft.replace_head(net, len(data.classes))
select = data.holdout(a.holdout, seed=a.seed) if a.holdout else data
h = ft.fine_tune(net, select, strategy=a.strategy, epochs=a.epochs, lr=a.lr, head_lr_mult=a.head_lr_mult,
                 weight_decay=a.wd, scheduler=a.sched, batchnorm=a.batchnorm, seed=a.seed, progress=False,
                 best=None if a.best == "last" else a.best, label_smoothing=a.ls)
val = ft.evaluate(net, data.val, device="cpu")["acc"]
secs = time.perf_counter() - start
rec = dict(vars(a), val_acc=round(val, 4), kept=h.kept, best_epoch=h.best_epoch, probe_epochs=h.probe_epochs,
           holdout_acc=[None if x is None else round(x, 4) for x in h.val_acc], seconds=round(secs, 1),
           load=round(os.getloadavg()[0], 2), commit=os.popen("git rev-parse --short HEAD").read().strip())
print(json.dumps(rec))
with open(Path(__file__).with_name("results.jsonl"), "a") as f:
    f.write(json.dumps(rec) + "\n")
