"""One training step and one evaluation pass: the code every loop in d2lft runs.

`fit`, `evaluate`, `predict`, `extract_features` and `lr_find` all move batches with the same
`Runner` (device, mixed precision, memory format) and differ only in what they do with the
outputs, so a speed-up or a fix here applies to all of them::

    runner = Runner.for_device("cpu")
    out, y, loss = train_step(net, batch, runner=runner, optimizer=opt, loss_fn=loss_fn)
    for out, y in eval_outputs(net, loader, runner=runner):
        ...
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from d2lft import distributed
from d2lft.device import evaluates_in_bf16, resolve_device
from d2lft.errors import ConfigError
from d2lft.freeze import preserved

__all__ = ["Runner", "train_step", "eval_outputs", "folded_batchnorm"]


@dataclass(frozen=True)
class Runner:
    """Where and how batches run: the device, the autocast dtype (None: float32), the memory format,
    whether evaluation folds BatchNorm into the convolutions before it, and whether evaluation runs
    in bfloat16 on the CPU (`d2lft.device.bf16_evaluation`, off by default).

    Defaults (`for_device`): mixed precision on CUDA only (bf16 where supported, else fp16 with
    loss scaling; on the CPU autocast was not faster for these convolutions); channels-last on
    CUDA (tensor cores) and on the CPU (oneDNN: Lite0 training steps measured 1.5x faster);
    folded BatchNorm for evaluation on the CPU (`folded_batchnorm`; the figures are in `for_net`).

    >>> Runner.for_device("cpu")
    Runner(device=device(type='cpu'), amp_dtype=None, channels_last=True, fold_batchnorm=True, eval_bf16=False)
    """

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    fold_batchnorm: bool = False
    eval_bf16: bool = False

    @classmethod
    def for_device(cls, device: str | torch.device | None = None, *, amp: bool | None = None,
                   channels_last: bool | None = None, fold_batchnorm: bool | None = None) -> Runner:
        device = resolve_device(device)
        if amp is None:
            amp = device.type == "cuda"
        dtype = None
        if amp:
            bf16 = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
            dtype = torch.bfloat16 if bf16 else torch.float16
        if channels_last is None:
            channels_last = device.type in ("cuda", "cpu")
        if fold_batchnorm is None:
            fold_batchnorm = device.type == "cpu"
        eval_bf16 = device.type == "cpu" and dtype is None and evaluates_in_bf16()
        return cls(device=device, amp_dtype=dtype, channels_last=channels_last, fold_batchnorm=fold_batchnorm,
                   eval_bf16=eval_bf16)

    @classmethod
    def for_net(cls, net: nn.Module, device: str | torch.device | None = None) -> Runner:
        """Evaluation on `device` (default: where the net's weights are): mixed precision on CUDA;
        float32 on the CPU, channels-last with BatchNorm folded (Lite0's backbone at 224 px, batch
        32, 2-core AVX2 EPYC, one process, best of 4: 25.2 images/s contiguous, 29.3 folded, 36.8
        channels-last, 57.8 both), outputs equal to about 1e-5, so predictions match golden
        references to the digits they give."""
        if device is None:
            p = next(net.parameters(), None)
            device = p.device if p is not None else None
        device = resolve_device(device)
        return cls.for_device(device, channels_last=device.type == "cpu")

    def inputs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x, y)`` on the device from a batch ``(x, y, ...)`` or a bare ``x``."""
        if isinstance(batch, (list, tuple)):
            x, y = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, y = batch, None
        if self.channels_last and x.ndim == 4:
            x = x.to(self.device, memory_format=torch.channels_last, non_blocking=True)
        else:
            x = x.to(self.device, non_blocking=True)
        return x, (y.to(self.device, non_blocking=True) if y is not None else None)

    def autocast(self, *, evaluation: bool = False):
        """Mixed precision for the forward pass (of an evaluation pass: `evaluation`), or nothing."""
        if evaluation and self.eval_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, net: nn.Module) -> nn.Module:
        """Move `net` to the device (and to channels-last when that is on); returns it."""
        net.to(self.device)
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        return net

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A loss scaler for fp16 (small gradients would underflow); None otherwise."""
        return torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None


def _targets(y: torch.Tensor | None, out: torch.Tensor, task: str) -> torch.Tensor:
    """Regression targets become floats shaped like the outputs ((B,) -> (B, 1))."""
    if y is None:
        raise ConfigError("the loader yields inputs only; training and evaluation need (inputs, targets) batches")
    return y.float().reshape(out.shape) if task == "regression" else y


def forward_batch(net: nn.Module, batch: Any, *, runner: Runner, loss_fn: Callable, task: str = "classification"
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Outputs, targets (shaped for the loss) and loss of one batch."""
    x, y = runner.inputs(batch)
    with runner.autocast():
        out = net(x)
        y = _targets(y, out, task)
        loss = loss_fn(out, y)
    return out, y, loss


def train_step(net: nn.Module, batch: Any, *, runner: Runner, optimizer: torch.optim.Optimizer, loss_fn: Callable,
               task: str = "classification", scaler: torch.amp.GradScaler | None = None,
               scheduler: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the loop from chapter 1: forward, backward, update (and a per-batch schedule).

    >>> from torch.utils.data import TensorDataset
    >>> net = nn.Linear(2, 2); opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> batch = (torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    >>> out, y, loss = train_step(net, batch, runner=Runner.for_net(net), optimizer=opt,
    ...                           loss_fn=nn.CrossEntropyLoss())
    >>> out.shape, loss.ndim
    (torch.Size([4, 2]), 0)
    """
    out, y, loss = forward_batch(net, batch, runner=runner, loss_fn=loss_fn, task=task)
    optimizer.zero_grad()
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return out, y, loss


def folded_batchnorm(net: nn.Module) -> nn.Module:
    """A copy of `net`, in eval mode, with each BatchNorm folded into the convolution before it; or `net`.

    In eval mode a ``BatchNorm2d`` is a fixed affine map (its running statistics, weight and
    bias), so a ``Conv2d`` followed by it is one convolution with other weights and a bias
    (`torch.nn.utils.fusion.fuse_conv_bn_eval`). The pairs folded are the consecutive children
    of an ``nn.Sequential``, the conv-BN(-activation) blocks of EfficientNet-Lite and of
    torchvision's models, where nothing else reads the convolution's output (speed: see
    `Runner.for_net`; outputs equal to 1.3e-5 on Lite0). `net` itself comes back when nothing
    folds, when `net` is in training mode, or when any module has hooks: they would run on the
    copy, or not at all.

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> net[1].running_mean += 1.0
    >>> fast = folded_batchnorm(net)
    >>> type(fast[1]).__name__, net[1] is not None
    ('Identity', True)
    >>> x = torch.randn(2, 3, 8, 8)
    >>> torch.allclose(fast(x), net(x), atol=1e-5)
    True
    """
    modules = list(net.modules())
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in modules)
    if net.training or hooked or isinstance(net, nn.parallel.DistributedDataParallel):
        return net

    from d2lft.efficientnet_lite import FOLDABLE_CONVS

    def pairs(module: nn.Module) -> list[tuple[str, str]]:
        children = list(module.named_children())
        return [(a, b) for (a, conv), (b, bn) in zip(children, children[1:])
                if type(conv) in FOLDABLE_CONVS and type(bn) is nn.BatchNorm2d
                and bn.running_mean is not None and not conv.training and not bn.training]

    if not any(isinstance(m, nn.Sequential) and pairs(m) for m in modules):
        return net
    fast = copy.deepcopy(net)
    for module in fast.modules():
        if isinstance(module, nn.Sequential):
            for a, b in pairs(module):
                setattr(module, a, nn.utils.fusion.fuse_conv_bn_eval(getattr(module, a), getattr(module, b)))
                setattr(module, b, nn.Identity())
    return fast


@torch.no_grad()
def eval_outputs(net: nn.Module, loader: Iterable, *, runner: Runner,
                 fn: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(outputs, targets)`` per batch in eval mode without gradients; layer modes come back after.

    `fn` defaults to ``net`` itself (``net.forward_features`` caches features). Under torchrun
    each process sees its share of the loader (`d2lft.distributed.shard_eval_loader`). With
    ``runner.fold_batchnorm`` (the CPU's default) a copy of `net` with BatchNorm folded into its
    convolutions (`folded_batchnorm`) computes the outputs; `net` itself is not changed.
    """
    fn = fn or net
    with preserved(net):
        net.eval()
        if runner.fold_batchnorm and (fn is net or getattr(fn, "__self__", None) is net):
            fast = folded_batchnorm(net)
            if fast is not net and runner.channels_last:
                fast.to(memory_format=torch.channels_last)  # a copy: the net keeps its own layout
            fn = fast if fn is net else getattr(fast, fn.__name__)
        for batch in distributed.shard_eval_loader(loader):
            x, y = runner.inputs(batch)
            with runner.autocast(evaluation=True):
                out = fn(x)
            yield out, y
