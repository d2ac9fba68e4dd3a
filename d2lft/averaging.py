"""Averaging weights: an EMA during training, WiSE-FT between two nets, model soups of several fine-tunes.

Nets fine-tuned from the same pretrained weights stay in one "basin" of the loss, so their
weights (not only their predictions, as `d2lft.average_predictions` does) can be averaged into
one net that costs a single forward pass:

* `EMA`: a `d2lft.fit` callback that keeps an exponential moving average of the weights along
  the run (``torch.optim.swa_utils.AveragedModel``), often a little better than the last step;
* `interpolate`: WiSE-FT (Wortsman et al., 2022), the weights ``(1 - alpha) * start + alpha * end``
  between the net before fine-tuning and after it, which often keeps more robustness to
  distribution shift than the fine-tuned end point;
* `uniform_soup` and `greedy_soup` (Wortsman et al., 2022, "Model soups"): the average of several
  fine-tunes, or only of those that help on held-out images.

Floating-point weights and buffers (BatchNorm's running statistics) are averaged; integer
buffers (BatchNorm's ``num_batches_tracked``) are counts, not weights, and are copied.
"""
from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from d2lft.errors import ConfigError

__all__ = ["EMA", "interpolate", "uniform_soup", "greedy_soup", "GreedySoup"]

StateOrNet = nn.Module | Mapping[str, torch.Tensor]


# ----------------------------------------------------------------------------- EMA


class EMA:
    """Callback: an exponential moving average of the weights, updated after every training step.

    After step ``t`` (1, 2, ...) of `d2lft.fit` the average becomes
    ``ema = d_t * ema + (1 - d_t) * weights``, starting from the weights `fit` started with. With
    `warmup` the decay grows with the steps, ``d_t = min(decay, (1 + t) / (10 + t))``: a decay
    of 0.999 from the first step would keep the average close to the pretrained start for
    thousands of steps, far more than a short fine-tune has (timm issue #1182). BatchNorm's
    running statistics are averaged too (``use_buffers=True``), so the average evaluates as is.

    After `fit`, ``ema.module`` is the averaged net (evaluate or save it: ``ft.evaluate(ema.module,
    loader)``) and ``ema.copy_to(net)`` puts its weights into `net`. The average follows every
    step of the run: `fit`'s ``best=`` does not apply to it. A second `fit` with the same `EMA`
    continues the same average; make a new one to start over. Checkpoints save and restore it.
    Cost: one more copy of the weights on the device, and one update per step (``AveragedModel``
    reads its step count on the host, so on a GPU each update waits for the step to finish).

    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from d2lft.train import fit
    >>> data = DataLoader(TensorDataset(torch.randn(32, 2), torch.randint(0, 2, (32,))), batch_size=8)
    >>> ema = EMA(decay=0.99)
    >>> _ = fit(nn.Linear(2, 2), data, epochs=2, callbacks=[ema], progress=False, seed=0)
    >>> ema.updates_, round(ema.decay_at(ema.updates_), 4), type(ema.module).__name__
    (8, 0.5, 'Linear')
    """

    def __init__(self, decay: float = 0.999, *, warmup: bool = True) -> None:
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0 <= decay < 1:
            raise ConfigError(f"EMA: decay must be a number in [0, 1) such as 0.999, got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.averaged_: AveragedModel | None = None
        self.updates_ = 0  # training steps averaged so far
        self._decay_now = self.decay
        self._saved: Mapping[str, Any] | None = None  # from a checkpoint, applied when the run starts

    def decay_at(self, step: int) -> float:
        """The decay of update `step` (counted from 1).

        >>> [round(EMA(0.999).decay_at(t), 3) for t in (1, 10, 100, 10_000)]
        [0.182, 0.55, 0.918, 0.999]
        """
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    # the callback

    def on_epoch_start(self, run: Any) -> None:
        if self.averaged_ is None:
            self.start(run.net)

    def on_batch_end(self, run: Any) -> None:
        self.update(run.net)

    def on_fit_end(self, run: Any) -> None:
        if self.averaged_ is not None:  # fit gives the caller's net back contiguous: the average too
            self.averaged_.to(memory_format=torch.contiguous_format)

    # the average

    def start(self, net: nn.Module) -> None:
        """Start the average from `net`'s weights (a copy, on the same device); `fit` calls this."""
        self.averaged_ = AveragedModel(net, multi_avg_fn=self._average, use_buffers=True)
        for p in self.averaged_.parameters():
            p.requires_grad_(False)  # the average is never trained
            p.grad = None
        if self._saved is not None:
            self.averaged_.load_state_dict(self._saved)
            self._saved = None
        else:
            self.averaged_.update_parameters(net)  # the first update copies the weights

    def update(self, net: nn.Module) -> None:
        """Average in `net`'s current weights (after a training step)."""
        if self.averaged_ is None:
            self.start(net)
        self.updates_ += 1
        self._decay_now = self.decay_at(self.updates_)
        self.averaged_.update_parameters(net)

    @torch.no_grad()
    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], _: Any) -> None:
        # AveragedModel calls this once per (device, dtype) group of tensors
        if averaged[0].is_floating_point():
            get_ema_multi_avg_fn(self._decay_now)(averaged, current, _)
        else:  # num_batches_tracked: a count, not a weight
            for a, c in zip(averaged, current):
                a.copy_(c)

    @property
    def module(self) -> nn.Module:
        """The averaged net (a copy of the trained net's module, with the averaged weights)."""
        if self.averaged_ is None:
            raise ConfigError("EMA: nothing averaged yet; pass it to fit(..., callbacks=[ema]) first")
        return self.averaged_.module

    def copy_to(self, net: nn.Module) -> None:
        """Load the averaged weights (and BatchNorm statistics) into `net`."""
        net.load_state_dict(self.module.state_dict())

    def state_dict(self) -> dict[str, Any]:
        """Settings, step count and the averaged weights, for checkpoints."""
        weights = None if self.averaged_ is None else {
            k: v.detach().to("cpu", copy=True) for k, v in self.averaged_.state_dict().items()}
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates_, "weights": weights}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay, self.warmup, self.updates_ = float(state["decay"]), bool(state["warmup"]), int(state["updates"])
        if state["weights"] is not None:
            if self.averaged_ is not None:
                self.averaged_.load_state_dict(state["weights"])
            else:
                self._saved = state["weights"]

    def __repr__(self) -> str:
        return f"EMA(decay={self.decay}, warmup={self.warmup}, updates={self.updates_})"


# ----------------------------------------------------------------------------- weight averages


def _state(item: Any, *, where: str, name: str) -> dict[str, torch.Tensor]:
    if isinstance(item, nn.Module):
        return item.state_dict()
    if isinstance(item, Mapping):
        return dict(item)
    raise TypeError(f"{where}: {name} must be an nn.Module or a state dict, got {type(item).__name__}")


def _weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], *,
                      names: Sequence[str], where: str, integers_from: int) -> dict[str, torch.Tensor]:
    """``sum(w * state)`` for floating-point entries; integer entries from ``states[integers_from]``."""
    reference = states[integers_from]
    for state, name in zip(states, names):
        if state.keys() != reference.keys():
            diff = sorted(set(state) ^ set(reference))[:3]
            raise ConfigError(f"{where}: {name} has other weights than {names[integers_from]} (e.g. {diff}); "
                              "average nets of one architecture only, fine-tuned from the same start")
        for key, value in state.items():
            if value.shape != reference[key].shape:
                raise ConfigError(
                    f"{where}: {key!r} has shape {tuple(value.shape)} in {name} but {tuple(reference[key].shape)} in "
                    f"{names[integers_from]}; average nets with the same architecture and head (same classes)")
    averaged = {}
    for key, ref in reference.items():
        if not ref.is_floating_point():
            averaged[key] = ref.detach().clone()
            continue
        total = torch.zeros_like(ref)
        for state, w in zip(states, weights):
            total += w * state[key].detach().to(device=ref.device, dtype=ref.dtype)
        averaged[key] = total
    return averaged


def _like(template: Any, state: dict[str, torch.Tensor]) -> Any:
    """A state dict, or a copy of the module `template` holding `state`."""
    if not isinstance(template, nn.Module):
        return state
    net = copy.deepcopy(template)
    net.load_state_dict(state)
    return net


def interpolate(start: StateOrNet, end: StateOrNet, alpha: float) -> StateOrNet:
    """WiSE-FT: the weights ``(1 - alpha) * start + alpha * end``, head included.

    `start` is the net before fine-tuning (for a new head: the head it started from, e.g. the
    net after a linear probe, as in LP-FT), `end` the fine-tuned net. ``alpha=0`` gives `start`,
    1 gives `end` (exactly), values in between mix them (Wortsman et al., 2022, found ~0.5
    keeps much of the pretrained robustness to distribution shift at almost the fine-tuned
    accuracy); values outside [0, 1] extrapolate. Integer buffers come from `end`. Returns a
    state dict, or a new net (a copy of `end`) when `end` is a net; the inputs are not changed.

    >>> start, end = nn.Linear(2, 1), nn.Linear(2, 1)
    >>> start.weight.data = torch.tensor([[0.0, 2.0]]); end.weight.data = torch.tensor([[1.0, 4.0]])
    >>> interpolate(start, end, 0.5).weight
    Parameter containing:
    tensor([[0.5000, 3.0000]], requires_grad=True)
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ConfigError(f"interpolate: alpha must be a finite number (0: start, 1: end), got {alpha!r}")
    states = [_state(start, where="interpolate", name="start"), _state(end, where="interpolate", name="end")]
    mixed = _weighted_average(states, [1 - float(alpha), float(alpha)], names=["start", "end"], where="interpolate",
                              integers_from=1)
    return _like(end, mixed)


def _ingredients(ingredients: Iterable[StateOrNet], where: str) -> list[StateOrNet]:
    ingredients = list(ingredients)
    if not ingredients:
        raise ConfigError(f"{where}: no ingredients given; pass a list of fine-tuned nets (or their state dicts)")
    return ingredients


def uniform_soup(ingredients: Iterable[StateOrNet]) -> StateOrNet:
    """The mean of the weights of several nets fine-tuned from the same start (a "uniform soup").

    Returns a state dict, or a new net (a copy of the first ingredient) when that is a net.
    Integer buffers come from the first ingredient.

    >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    >>> a.bias.data, b.bias.data = torch.tensor([1.0]), torch.tensor([3.0])
    >>> uniform_soup([a, b]).bias.item()
    2.0
    """
    ingredients = _ingredients(ingredients, "uniform_soup")
    names = [f"ingredient {i}" for i in range(len(ingredients))]
    states = [_state(x, where="uniform_soup", name=n) for x, n in zip(ingredients, names)]
    mean = _weighted_average(states, [1 / len(states)] * len(states), names=names, where="uniform_soup",
                             integers_from=0)
    return _like(ingredients[0], mean)


@dataclass
class GreedySoup:
    """What `greedy_soup` returns: the soup, which ingredients it holds and the held-out accuracies."""

    net: nn.Module
    ingredients: list[int]  # indices into the list given, in the order they were added
    score: float  # the soup's accuracy on the selection loader
    scores: list[float]  # each ingredient's accuracy there


def greedy_soup(ingredients: Sequence[nn.Module], loader: Iterable, *,
                device: str | torch.device | None = None) -> GreedySoup:
    """A greedy soup (Wortsman et al., 2022): average in only the fine-tunes that help on held-out images.

    The ingredients are sorted by their accuracy on `loader`; the soup starts as the best one,
    and each next ingredient joins when the uniform average with it scores at least as well as
    the soup without it. So the soup never scores below its best ingredient on `loader`.

    `loader` chooses, so it must not be the images the final number is reported on: carve it
    from the training images (``data.holdout(0.2).val``, with the ingredients trained on
    ``data.holdout(0.2).train``) and keep ``val/`` for the final figure.

    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> x = torch.randn(64, 2); data = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=32)
    >>> good, wrong = nn.Linear(2, 2), nn.Linear(2, 2)    # wrong: the classes swapped
    >>> good.weight.data = torch.tensor([[-1.0, 0.0], [1.0, 0.0]]); good.bias.data = torch.zeros(2)
    >>> wrong.weight.data = -good.weight.data; wrong.bias.data = torch.zeros(2)
    >>> soup = greedy_soup([wrong, good], data)
    >>> soup.ingredients, soup.score
    ([1], 1.0)
    """
    from d2lft.train import evaluate

    ingredients = _ingredients(ingredients, "greedy_soup")
    for i, net in enumerate(ingredients):
        if not isinstance(net, nn.Module):
            raise TypeError(f"greedy_soup: ingredient {i} is a {type(net).__name__}; pass nets (they are evaluated)")
    scores = [evaluate(net, loader, device=device)["acc"] for net in ingredients]
    order = sorted(range(len(ingredients)), key=lambda i: -scores[i])
    kept = [order[0]]
    soup, best = copy.deepcopy(ingredients[order[0]]), scores[order[0]]
    for i in order[1:]:
        candidate = uniform_soup([ingredients[j] for j in kept + [i]])
        score = evaluate(candidate, loader, device=device)["acc"]
        if score >= best:
            kept.append(i)
            soup, best = candidate, score
    return GreedySoup(net=soup, ingredients=kept, score=best, scores=scores)
