"""Train on several processes (one per GPU, or several on a CPU) with ``torch.distributed``.

Launch the same script or command with ``torchrun``; nothing else changes::

    torchrun --nproc-per-node 2 -m d2lft finetune data/hymenoptera_data

torchrun starts one process per device and tells each its place through the environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``). `d2lft.fit` then does five things differently, each
with one function of this module:

1. `setup` joins the process group once (NCCL on CUDA, gloo on CPU) and picks this process's GPU:
   call it yourself at the start (the ``d2lft`` command line does), `fit` refuses to start without it;
2. `wrap` puts the model in ``DistributedDataParallel``, which averages the gradients of all
   processes after every backward pass, so every copy of the weights takes the same step;
3. `shard_loader` gives each process its own part of the training data (a ``DistributedSampler``;
   the batch size is per process, so the global batch is ``world_size() * batch_size``);
4. `shard_eval_loader` splits the validation set exactly (no padding, no duplicates) and
   `all_reduce_sum` adds up the loss sums and correct counts, so all processes report the same
   accuracy; `gather_eval_shards` puts sharded results (cached features) back together in order;
5. only the main process (`is_main_process`) prints, draws and writes files.

Without torchrun every function here does nothing (returns its input), so the plain path is the
single-process one. The only state is ``torch.distributed``'s own process group.
"""
from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

from d2lft.errors import ConfigError

__all__ = [
    "launched",
    "is_distributed",
    "rank",
    "world_size",
    "is_main_process",
    "setup",
    "wrap",
    "check_setup",
    "shard_loader",
    "shard_eval_loader",
    "set_epoch",
    "all_reduce_sum",
    "gather_eval_shards",
]


def _torchrun_env() -> dict[str, int]:
    """What torchrun tells each process (read here only): its rank, the world size, its local rank."""
    return {
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "rank": int(os.environ.get("RANK", "0")),
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
    }


def launched() -> bool:
    """True in a process started by ``torchrun --nproc-per-node N`` with N > 1.

    >>> launched()  # plain python or pytest
    False
    """
    return _torchrun_env()["world_size"] > 1


def is_distributed() -> bool:
    """True once the process group is up with more than one process (collectives are live).

    >>> is_distributed()
    False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's number, 0 to ``world_size() - 1`` (0 without torchrun).

    Read from the process group once it exists, before that from torchrun's environment, so
    code that runs before `setup` (loading data, say) can already ask `is_main_process`.

    >>> rank()
    0
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _torchrun_env()["rank"]


def world_size() -> int:
    """How many processes train together (1 without torchrun).

    >>> world_size()
    1
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _torchrun_env()["world_size"]


def is_main_process() -> bool:
    """True on the process that prints, plots and writes files (rank 0; always true without torchrun).

    >>> is_main_process()
    True
    """
    return rank() == 0


def setup(device: str | torch.device) -> torch.device:
    """Join the process group (once) when launched by torchrun; returns the device to train on.

    Under torchrun a CUDA device becomes ``cuda:LOCAL_RANK``: one GPU per process. The backend
    is NCCL for CUDA and gloo for the CPU. Without torchrun, `device` is returned as it is and
    nothing else happens. Calling it again (a second `fit`) reuses the group.

    >>> setup("cpu")
    device(type='cpu')
    """
    device = torch.device(device)
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", _torchrun_env()["local_rank"])
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(
            f"device={str(device)!r}: several processes (torchrun, WORLD_SIZE={world_size()}) can train on "
            "CUDA GPUs or on the CPU only; pass device='cuda' or device='cpu'"
        )
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE come from torchrun ("env://").
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        # Leave the group cleanly when the script ends (NCCL warns otherwise).
        atexit.register(_destroy)
    return device


def check_setup(device: torch.device) -> None:
    """Under torchrun, refuse to train before `setup` joined the process group (one clear line).

    >>> check_setup(torch.device("cpu"))  # one process: nothing to check
    """
    if launched() and not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(f"launched by torchrun (WORLD_SIZE={world_size()}) but the process group is not set up: "
                          f"call d2lft.distributed.setup({str(device.type)!r}) before fit")


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(net: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(net)`` when training on several processes, else `net` itself.

    Train through the returned module (its backward pass averages the gradients across
    processes); evaluate, save and change `net` itself. DDP only synchronises the parameters that
    train when it is made: after unfreezing, wrap again.

    >>> net = nn.Linear(2, 1)
    >>> wrap(net, torch.device("cpu")) is net  # one process: nothing to do
    True
    """
    if not is_distributed():
        return net
    if not any(p.requires_grad for p in net.parameters()):
        return net  # nothing trains, so there are no gradients to average
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(net, device_ids=device_ids)


def _check_shardable(loader: DataLoader) -> None:
    """Raise an error that says what to pass when `loader` cannot be split across processes."""
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"got a {type(loader).__name__} to split across {world_size()} processes: "
            "under torchrun pass torch.utils.data.DataLoader objects (each process then reads its share)"
        )
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        raise ConfigError(
            f"cannot shard a DataLoader over {type(loader.dataset).__name__} with batch_size={loader.batch_size}: "
            "several processes need a map-style dataset and a batch_size (not a batch_sampler)"
        )


def _rebuild(loader: DataLoader, sampler) -> DataLoader:
    """`loader` again, with the same batch size and workers, drawing its items from `sampler`."""
    options = {"prefetch_factor": loader.prefetch_factor} if loader.num_workers > 0 else {}
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
        **options,
    )


def shard_loader(loader: DataLoader, *, shuffle: bool | None = None, seed: int = 0) -> DataLoader:
    """A training loader that gives this process its share of each epoch (``DistributedSampler``).

    The batch size stays the same *per process*. `shuffle` defaults to what `loader` does;
    with shuffling, every process draws the same permutation (from `seed` and the epoch: call
    `set_epoch` at the start of each epoch) and takes every ``world_size()``-th item of it.
    The sampler pads with repeated items so all processes run the same number of steps (which
    DDP needs). Without torchrun `loader` is returned as it is.

    >>> loader = DataLoader(list(range(10)), batch_size=4, shuffle=True)
    >>> shard_loader(loader) is loader
    True
    """
    if not is_distributed() or isinstance(getattr(loader, "sampler", None), DistributedSampler):
        return loader
    _check_shardable(loader)
    if shuffle is None:
        if not isinstance(loader.sampler, (RandomSampler, SequentialSampler)):
            raise ConfigError(
                f"cannot split a DataLoader whose sampler is a {type(loader.sampler).__name__} across "
                f"{world_size()} processes: DistributedSampler replaces it (shuffle=True/False only); for class "
                "imbalance under torchrun, weight the loss instead (loss_fn=nn.CrossEntropyLoss(weight=...))"
            )
        shuffle = isinstance(loader.sampler, RandomSampler)
    sampler = DistributedSampler(loader.dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed)
    return _rebuild(loader, sampler)


def shard_eval_loader(loader: DataLoader) -> DataLoader:
    """An evaluation loader over items ``rank, rank + world_size, ...``: every item exactly once.

    Unlike ``DistributedSampler`` nothing is padded, so summing the processes' counts with
    `all_reduce_sum` gives exact metrics; the processes may run different numbers of batches,
    so evaluate the unwrapped model (no collective inside the loop). Without torchrun `loader`
    is returned as it is.

    >>> loader = DataLoader(list(range(5)), batch_size=2)
    >>> shard_eval_loader(loader) is loader
    True
    """
    if not is_distributed():
        return loader
    _check_shardable(loader)
    return _rebuild(loader, range(rank(), len(loader.dataset), world_size()))


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell a `shard_loader` loader which epoch starts, so each epoch has its own order.

    Does nothing for other loaders.

    >>> set_epoch(DataLoader(list(range(4))), 1)
    """
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all processes (a new tensor, on `tensor`'s device).

    Sum *counts and sums* (loss sum, correct predictions, number of samples), then divide:
    averaging per-process averages would weight unequal shards wrongly.

    >>> all_reduce_sum(torch.tensor([3.0, 4.0]))  # one process: the tensor itself
    tensor([3., 4.])
    """
    if not is_distributed():
        return tensor
    # NCCL only reduces CUDA tensors; gloo reduces CPU tensors.
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = tensor.detach().to(on, copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(tensor.device)


def gather_eval_shards(shard: torch.Tensor) -> torch.Tensor:
    """Undo `shard_eval_loader`: every process gets all rows, in the dataset's order (on the CPU).

    Process ``r`` holds the rows of items ``r, r + world_size, ...``; the result interleaves them.

    >>> gather_eval_shards(torch.arange(3))  # one process: the shard is everything
    tensor([0, 1, 2])
    """
    if not is_distributed():
        return shard
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, shard.detach().cpu())
    like = max(parts, key=len)  # a process with no items may hold a shard of another shape, e.g. (0,)
    full = torch.empty((sum(len(p) for p in parts), *like.shape[1:]), dtype=like.dtype)
    for r, part in enumerate(parts):
        full[r :: world_size()] = part
    return full
