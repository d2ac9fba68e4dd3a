"""The `d2lft` command line: fine-tune, predict, manage datasets, benchmark.

    d2lft finetune DATA_DIR [--model NAME] [--strategy S] [--epochs N] [--json PATH]
    d2lft predict IMAGE... [--model NAME] [--topk K]
    d2lft data list | d2lft data download NAME
    d2lft bench [--model NAME] [--image-size N] [--device cpu|cuda]

Errors a user can fix (a wrong folder, a bad setting, no network) print one line and exit with
status 1; usage errors exit with status 2 (argparse's convention).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


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


def _parser() -> argparse.ArgumentParser:
    from d2lft.models import list_models
    from d2lft.recipes import DEFAULTS, STRATEGIES

    parser = argparse.ArgumentParser(prog="d2lft", description="Fine-tune pretrained vision models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ft = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained model on an image folder",
        description="Fine-tune a pretrained model on DATA_DIR, which holds train/ and val/ (or test/) class folders.",
    )
    ft.add_argument("data_dir", metavar="DATA_DIR", type=Path)
    ft.add_argument("--model", default=DEFAULTS["model"], choices=list_models(), metavar="NAME",
                    help=f"backbone (default {DEFAULTS['model']}; one of: {', '.join(list_models())})")
    ft.add_argument("--strategy", default=DEFAULTS["strategy"], choices=STRATEGIES,
                    help=f"default {DEFAULTS['strategy']}")
    ft.add_argument("--epochs", type=_positive_int, default=None,
                    help="epochs (default: 30 for probe, whose epochs on cached features take milliseconds, else 3)")
    ft.add_argument("--image-size", type=_positive_int, default=DEFAULTS["image_size"],
                    help=f"default {DEFAULTS['image_size']}")
    ft.add_argument("--batch-size", type=_positive_int, default=DEFAULTS["batch_size"],
                    help=f"default {DEFAULTS['batch_size']}")
    ft.add_argument("--lr", type=_positive_float, default=DEFAULTS["lr"],
                    help=f"backbone learning rate; the head gets 10x (default {DEFAULTS['lr']})")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available)")
    ft.add_argument("--checkpoint", type=Path, default=None, help="save the best model here (.pt)")
    ft.add_argument("--json", type=Path, default=None, help="write the final figures here")

    pr = sub.add_parser("predict", help="ImageNet labels for images (direct application of a pretrained model)")
    pr.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    pr.add_argument("--model", default="efficientnet_lite0", choices=list_models(), metavar="NAME")
    pr.add_argument("--topk", type=_positive_int, default=5)

    data = sub.add_parser("data", help="list or download the registry's datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    data_sub.add_parser("list", help="list the datasets d2lft knows")
    dl = data_sub.add_parser("download", help="download, verify and extract a dataset into the data directory")
    dl.add_argument("name")
    dl.add_argument("--root", type=Path, default=None, help="data directory (default $D2LFT_DATA_DIR or ./data)")

    bench = sub.add_parser("bench", help="images/s of a plain PyTorch loop vs d2lft.fit, side by side")
    bench.add_argument("--model", default="efficientnet_lite0", choices=list_models(), metavar="NAME",
                       help="backbone (default efficientnet_lite0)")
    bench.add_argument("--image-size", type=_positive_int, default=224, help="default 224")
    bench.add_argument("--batch-size", type=_positive_int, default=32, help="default 32")
    bench.add_argument("--steps", type=_positive_int, default=10, help="timed steps per contender (default 10)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    bench.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available)")
    bench.add_argument("--data", type=Path, default=None, help="image folder to read (default: the course dataset)")
    bench.add_argument("--json", type=Path, default=None, help="write the figures here")
    return parser


def _finetune(args: argparse.Namespace) -> int:
    from d2lft.distributed import is_main_process
    from d2lft.recipes import run_finetune

    report = run_finetune(
        args.data_dir,
        model=args.model,
        strategy=args.strategy,
        epochs=args.epochs,
        image_size=args.image_size,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        checkpoint=args.checkpoint,
    )
    if not is_main_process():  # under torchrun, rank 0 alone reports
        return 0
    if report["val_acc"] is not None:
        print(
            f"val_acc {report['val_acc']:.3f} (best {report['best_val_acc']:.3f}) after {report['epochs']} epochs, "
            f"{report['train_seconds']:.1f} s, {report['images_per_second']:.1f} images/s"
        )
    if report["skipped"]:
        print(f"skipped {len(report['skipped'])} file(s), unreadable or not an image type: " + ", ".join(report["skipped"]))
    if args.json:
        _write_json(args.json, report)
    halted = report["interrupted"] or (report["stop_reason"] or "").startswith("non-finite")
    if halted:  # the JSON and the checkpoint above still hold what was gathered
        kept = [str(p) for p in (args.json, args.checkpoint) if p is not None]
        print(f"d2lft finetune: stopped: {report['stop_reason']}" + (f"; kept {', '.join(kept)}" if kept else ""),
              file=sys.stderr)
        return 130 if report["interrupted"] else 1
    return 0


def _predict(args: argparse.Namespace) -> int:
    from d2lft.models import create_model
    from d2lft.inference import classify

    net = create_model(args.model)
    for path, labels in zip(args.images, classify(net, args.images, topk=args.topk)):
        print(path)
        for name, prob in labels:
            print(f"  {prob:6.1%}  {name}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from d2lft.data import get_dataset, list_datasets

    if args.data_command == "list":
        for info in list_datasets():
            print(f"{info.name:12s} {info.description}")
        return 0
    path = get_dataset(args.name, root=args.root, download=True)
    print(f"{args.name}: ready at {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from d2lft.bench import bench, format_report

    report = bench(
        model=args.model,
        image_size=args.image_size,
        batch_size=args.batch_size,
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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


def _user_errors() -> tuple[type[Exception], ...]:
    """The exceptions whose message tells the user what to fix: printed as one line, no traceback."""
    from d2lft.download import DownloadError
    from d2lft.images import BadImageError
    from d2lft.models import WeightsUnavailableError
    from d2lft.train import CheckpointError

    return (ValueError, FileNotFoundError, DownloadError, BadImageError, WeightsUnavailableError, CheckpointError)


_COMMANDS = {"finetune": _finetune, "predict": _predict, "data": _data, "bench": _bench}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    >>> main(["data", "list"])  # doctest: +ELLIPSIS
    hotdog ...
    0
    """
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except _user_errors() as err:
        print(f"d2lft {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside training (loading, caching): nothing to keep yet
        print(f"d2lft {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
