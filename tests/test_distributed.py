"""Tests for d2lft.distributed: two gloo processes on the CPU train like one process with twice the batch.

The two-process test launches this file with ``torchrun --nproc-per-node 2`` (the ``__main__``
block at the end is the worker each process runs), then compares with a one-process run in
the test itself: per-process batch B on 2 processes vs batch 2B on 1, with the same data order.

BatchNorm: in train mode each process would normalise with the statistics of its own B images,
not of the global 2B, so a trainable BatchNorm breaks the equivalence (SyncBatchNorm would
restore it, but torch runs it on CUDA only). The test net's BatchNorm is frozen, so it stays in
eval mode with fixed statistics, which is also what fine-tuning a frozen backbone does.
"""
from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from d2lft import distributed
from d2lft.net import Net, Preprocessing

BATCH = 4  # per process; the one-process reference uses 2 * BATCH
EPOCHS = 2
LR = 0.05
SEED = 0


# --------------------------------------------------------------------------- one process


def test_without_torchrun_everything_is_a_no_op():
    net = nn.Linear(3, 2)
    loader = DataLoader(list(range(7)), batch_size=2, shuffle=True)
    assert not distributed.launched() and not distributed.is_distributed()
    assert distributed.setup("cpu") == torch.device("cpu")
    assert distributed.wrap(net, torch.device("cpu")) is net
    distributed.check_setup(torch.device("cpu"))  # nothing to join
    assert distributed.shard_loader(loader) is loader
    assert distributed.shard_eval_loader(loader) is loader
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main_process()


def test_rank_comes_from_torchrun_before_setup(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.launched()
    assert distributed.rank() == 1 and distributed.world_size() == 2
    assert not distributed.is_main_process()  # so code before fit can already stay quiet


def test_setup_rejects_a_device_several_processes_cannot_share(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="device='cuda' or device='cpu'"):
        distributed.setup("mps")


def test_fit_under_torchrun_without_setup_says_what_to_call(monkeypatch):
    from d2lft.train import fit

    monkeypatch.setenv("WORLD_SIZE", "2")
    data = DataLoader([(torch.zeros(2), 0)] * 4, batch_size=2)
    with pytest.raises(ValueError, match=r"call d2lft.distributed.setup\('cpu'\) before fit"):
        fit(nn.Linear(2, 2), data, epochs=1, device="cpu", progress=False)


# --------------------------------------------------------------------------- two processes


def _tiny_net() -> Net:
    """A small conv net whose BatchNorm is frozen, with non-trivial running statistics."""
    from d2lft.freeze import freeze

    torch.manual_seed(SEED)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    backbone[1].running_mean.uniform_(-0.5, 0.5)
    backbone[1].running_var.uniform_(0.5, 2.0)
    net = Net(backbone, nn.Linear(8, 5), blocks=["0", "1"], num_features=8, name="tiny",
              preprocessing=Preprocessing(image_size=32))
    freeze(net, "backbone.1")
    return net


def _data(root: Path, *, batch_size: int):
    from d2lft.data import image_folders
    from d2lft.synthetic import make_shapes

    folder = make_shapes(root, image_size=32, train_per_class=4, val_per_class=3)  # 20 train, 15 val images
    # No augmentation: random crops would draw from each process's own random stream.
    return image_folders(folder, Preprocessing(image_size=32), batch_size=batch_size, augment="none",
                         progress=False)


def _fit(net: Net, train, val, *, checkpoint: Path | None, progress: bool):
    from d2lft.train import fit

    optimizer = torch.optim.SGD(net.parameters(), lr=LR)  # no momentum: a step depends on this batch only
    return fit(net, train, val, epochs=EPOCHS, optimizer=optimizer, scheduler=None, device="cpu",
               checkpoint=checkpoint, progress=progress, seed=SEED)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """Run the worker below on 2 processes; returns the folder with each rank's results."""
    out = tmp_path_factory.mktemp("ddp")
    _data(out, batch_size=BATCH)  # generate the images once, before two processes race to do it
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), __file__, str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_two_processes_train_like_one_with_twice_the_batch(two_processes):
    ranks = [torch.load(two_processes / f"rank{r}.pt", weights_only=True) for r in range(2)]
    data = _data(two_processes, batch_size=2 * BATCH)
    # The same order as DistributedSampler on 2 processes: one permutation per epoch from the seed,
    # of which rank r takes items r, r+2, ...; one global batch is exactly the union of the two.
    sampler = DistributedSampler(data.train_dataset, num_replicas=1, rank=0, shuffle=True, seed=SEED)
    train = DataLoader(data.train_dataset, batch_size=2 * BATCH, sampler=sampler)
    net = _tiny_net()
    history = _fit(net, train, data.val, checkpoint=None, progress=False)

    for result in ranks:
        for name, value in net.state_dict().items():
            torch.testing.assert_close(result["state"][name], value, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(result["train_loss"], torch.tensor(history.train_loss), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(result["val_loss"], torch.tensor(history.val_loss), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(result["val_acc"], torch.tensor(history.val_acc), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_both_ranks_report_the_same_validation_over_all_images(two_processes):
    ranks = [torch.load(two_processes / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(ranks[0]["val_acc"], ranks[1]["val_acc"])
    assert torch.equal(ranks[0]["val_loss"], ranks[1]["val_loss"])
    # 15 images: 8 + 7, no padding, so the accuracy is a multiple of 1/15.
    for acc in ranks[0]["val_acc"].tolist():
        assert abs(acc * 15 - round(acc * 15)) < 1e-6


@pytest.mark.slow
def test_features_are_gathered_in_order_on_every_rank(two_processes):
    from d2lft.features import extract_features

    ranks = [torch.load(two_processes / f"rank{r}.pt", weights_only=True) for r in range(2)]
    data = _data(two_processes, batch_size=2 * BATCH)
    net = _tiny_net()
    net.load_state_dict(ranks[0]["state"])
    expected = extract_features(net, data.val, device="cpu", progress=False).tensors
    for result in ranks:
        assert result["features"].shape == (15, 8)
        torch.testing.assert_close(result["features"], expected[0], atol=1e-5, rtol=1e-4)
        assert torch.equal(result["feature_targets"], expected[1])


@pytest.mark.slow
def test_only_rank_0_prints_and_writes(two_processes):
    assert (two_processes / "best.pt").is_file()
    rank0, rank1 = (torch.load(two_processes / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert any(path.endswith("best.pt") for path in rank0["written"])
    assert rank1["written"] == []
    assert "epoch 2/2" in (two_processes / "rank0.log").read_text()  # the progress bars
    assert "features" in (two_processes / "rank0.log").read_text()
    assert (two_processes / "rank1.log").read_text() == ""


# --------------------------------------------------------------------------- the worker


class _Terminal(io.StringIO):
    """Captured output that looks like a terminal, so tqdm draws its progress bars into it."""

    def isatty(self) -> bool:
        return True


def _worker(out: Path) -> None:
    """What each torchrun process runs: fit and extract features, then save what the tests compare."""
    import contextlib
    import warnings

    from d2lft.features import extract_features

    rank = distributed.rank()
    distributed.setup("cpu")  # joins the process group, as the command line does
    data = _data(out, batch_size=BATCH)
    net = _tiny_net()
    written: list[str] = []

    def record_writes(event: str, args: tuple) -> None:
        # Every file this process opens for writing (or renames into place) under `out`.
        if event == "open" and isinstance(args[0], (str, os.PathLike)):
            path, mode, flags = args
            if (mode is not None and set(mode) & set("wax+")) or (mode is None and flags & (os.O_WRONLY | os.O_RDWR)):
                written.append(str(path))
        elif event in ("os.rename", "os.replace"):
            written.append(str(args[1]))

    warnings.simplefilter("ignore")  # the logs should hold what d2lft prints, not library warnings
    log = _Terminal()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        sys.addaudithook(record_writes)
        history = _fit(net, data.train, data.val, checkpoint=out / "best.pt", progress=True)
        features = extract_features(net, data.val, device="cpu", progress=True)
        mine = [path for path in written if Path(path).resolve().is_relative_to(out.resolve())]
    (out / f"rank{rank}.log").write_text(log.getvalue())
    torch.save(
        {
            "state": net.state_dict(),
            "train_loss": torch.tensor(history.train_loss),
            "val_loss": torch.tensor(history.val_loss),
            "val_acc": torch.tensor(history.val_acc),
            "features": features.tensors[0],
            "feature_targets": features.tensors[1],
            "written": mine,
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
