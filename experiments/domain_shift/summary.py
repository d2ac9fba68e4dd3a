"""One line per run in results.jsonl (and mean ± sd over seeds per setting): python experiments/summary.py"""
import json
import statistics
from collections import defaultdict
from pathlib import Path

rows = [json.loads(line) for line in Path(__file__).with_name("results.jsonl").read_text().splitlines() if line]
groups = defaultdict(list)
new = [r for r in rows if "recipe" not in r]  # recipe.py's lines (2026-12-02)
rows = [r for r in rows if "recipe" in r]
for r in rows:
    if r["recipe"] == "probe-carve":
        continue
    s = dict(r["settings"]); s.pop("tag", None)
    key = (r["dataset"], r["recipe"], json.dumps(s, sort_keys=True))
    groups[key].append(r)
    ph = r.get("phases", {})
    extra = " ".join(f"{k}: val {v['val_acc']:.3f} hold {v['holdout_acc']:.3f}" for k, v in ph.items())
    print(f"{r['dataset']:8s} {r['recipe']:9s} seed {r['seed']} size {s['size']} aug {s['augment']} bn {s['bn']} "
          f"lr {s['lr']} ep {s['epochs']} | kept {r['kept']} val {r['val_acc']:.3f} hold {r['holdout_acc']:.3f} "
          f"{r['seconds']:.0f}s load {r['load']:.1f} thr {r.get('threads', 2)} | {extra}")
print()
for (d, rec, s), rs in groups.items():
    if len(rs) > 1:
        v = [r["val_acc"] for r in rs]
        print(f"{d} {rec} {s}: val {statistics.mean(v):.3f} ± {statistics.stdev(v):.3f} (n={len(v)}), "
              f"seconds {statistics.mean(r['seconds'] for r in rs):.0f}")

print("\nrecipe.py (fine_tune on the current API; val/ reported once, choices on a 20 % hold-out unless --holdout):")
by = defaultdict(list)
for r in new:
    key = {k: r[k] for k in ("data", "strategy", "size", "augment", "batchnorm", "lr", "epochs", "ls", "batch_size",
                             "holdout")}
    by[json.dumps(key)].append(r)
    print(f"{r['data'][:8]:8s} seed {r['seed']} {key} | kept {r['kept']} val {r['val_acc']:.3f} {r['seconds']:.0f}s "
          f"load {r['load']:.1f}")
for key, rs in by.items():
    if len(rs) > 1:
        v = [r["val_acc"] for r in rs]
        print(f"{key}: val {statistics.mean(v):.3f} ± {statistics.stdev(v):.3f} (n={len(v)})")
