"""Issue 10: the default (auto) on eurosat_small for one seed, then val/ and hold-out accuracy with 1, 2, 4, 8 views.

    D2LFT_DATA_DIR=../shared/data python experiments/domain_shift/tta.py SEED [SIZE]

Appends a line to tta.jsonl beside this file (see README.md, fourth session).
"""
import json, os, sys, time
from pathlib import Path
import torch, torch.nn as nn, math
import d2lft as ft
from d2lft.recipes import selection_split

class Views(nn.Module):
    def __init__(self, net, kind):
        super().__init__(); self.net, self.kind = net, kind
    def views(self, x):
        if self.kind == "none": return [x]
        if self.kind == "hflip": return [x, x.flip(-1)]
        if self.kind == "flips": return [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]
        if self.kind == "d4":
            r = [torch.rot90(x, k, (-2, -1)) for k in range(4)]
            return r + [v.flip(-1) for v in r]
    def forward(self, x):
        lp = torch.stack([self.net(v).float().log_softmax(1) for v in self.views(x)])
        return torch.logsumexp(lp, 0) - math.log(len(lp))

seed = int(sys.argv[1]); size = int(sys.argv[2]) if len(sys.argv) > 2 else 128
root = Path(os.environ["D2LFT_DATA_DIR"]) / "eurosat_small"
t0 = time.perf_counter()
ft.set_seed(seed)
net = ft.create_model("efficientnet_lite0")
data = ft.image_folders(root, net, image_size=size, batch_size=32, seed=seed, progress=False)
ft.replace_head(net, len(data.classes))
h = ft.fine_tune(net, data, seed=seed, progress=False)
secs = time.perf_counter() - t0
hold = selection_split(data, seed=seed)[0]
rec = dict(seed=seed, size=size, seconds=round(secs, 1), kept=h.kept, decision=h.decision, load=os.getloadavg()[0])
net.eval()
for kind in ["none", "hflip", "flips", "d4"]:
    m = Views(net, kind)
    rec[f"val_{kind}"] = round(ft.evaluate(m, data.val, device="cpu")["acc"], 4)
    rec[f"hold_{kind}"] = round(ft.evaluate(m, hold.val, device="cpu")["acc"], 4)
print(json.dumps(rec), flush=True)
with open(Path(__file__).with_name("tta.jsonl"), "a") as f: f.write(json.dumps(rec) + "\n")
