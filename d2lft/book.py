"""Helpers for the course's chapters: set-up, glued numbers and measured tables.

Each chapter starts with the same few lines (which dataset, which sizes for this machine, the
model and its data); the helpers here keep that plumbing out of the lessons::

    from d2lft import book
    settings = book.settings()                 # small sizes on a CPU, larger on a GPU
    net, data = book.model_and_data(settings)  # Lite0 with a new head, the course photos

`glue` publishes several numbers to the page at once (myst-nb's ``glue``), and `table` turns
measured rows into a Markdown table. Nothing here is needed outside the book.
"""
from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from d2lft.device import get_device, keep_freed_memory
from d2lft.errors import ConfigError

__all__ = ["Settings", "settings", "course_settings", "model_and_data", "shifted_dataset", "glue", "table", "mean_sd", "pm",
           "Difference", "paired_difference"]


@dataclass(frozen=True)
class Settings:
    """Sizes the chapters use: small on a CPU so each runs in about a minute, larger on a GPU.

    `image_size` is the photos' size for single runs; `comparison_size` theirs in comparisons that
    train every setting for several seeds (on a CPU smaller, resized from the same decoded images
    with ``data.resized(settings.comparison_size)``); `tile_size` the satellite tiles' size.
    """

    device: torch.device
    image_size: int
    batch_size: int
    epochs_scale: int
    root: Path | None = None
    comparison_size: int = 96
    tile_size: int = 64


def settings(device: str | torch.device | None = None, *, root: Path | None = None) -> Settings:
    """The chapters' settings for this machine (and, on a CPU, the allocator setting of `d2lft.device`).

    >>> config = settings("cpu")
    >>> config.image_size, config.comparison_size, config.tile_size
    (128, 96, 64)
    """
    device = torch.device(device) if device is not None else get_device()
    if device.type == "cuda":
        return Settings(device=device, image_size=224, batch_size=64, epochs_scale=3, root=root,
                        comparison_size=224, tile_size=128)
    keep_freed_memory()  # process-wide: faster CPU training steps (see d2lft.device)
    return Settings(device=device, image_size=128, batch_size=32, epochs_scale=1, root=root,
                    comparison_size=96, tile_size=64)


course_settings = settings


def model_and_data(config: Settings, *, root: Path | None = None, name: str = "efficientnet_lite0",
                   augment: str = "crop+flip", seed: int = 0):
    """The chapter's pretrained model with a new head sized for the data, and the data prepared for it.

    `root` defaults to `d2lft.course_dataset()` (the ants-vs-bees photos, or "shapes" offline).
    The random generators are seeded first (`seed`), so the new head, and every number the
    chapter computes from it, are the same in every run.
    """
    from d2lft.data import image_folders
    from d2lft.datasets import course_dataset
    from d2lft.device import set_seed
    from d2lft.models import create_model, replace_head

    set_seed(seed)
    root = root or config.root or course_dataset()
    net = create_model(name)
    data = image_folders(root, net, image_size=config.image_size, batch_size=config.batch_size,
                         augment=augment, progress=False)
    replace_head(net, data.num_outputs)
    return net, data


def shifted_dataset(*, root: Path | None = None, verbose: bool = True) -> Path:
    """Chapter 5's images far from ImageNet: the EuroSAT tiles if found, else the generated "shifted shapes".

    ``eurosat_small`` is looked up under `root` (default: the data directory, ``$D2LFT_DATA_DIR``);
    it cannot be downloaded. Without it, the "shapes" scenes recorded through another sensor
    (`d2lft.synthetic.make_shapes` with ``shifted=True``, 64 px) stand in, generated in seconds
    next to "shapes". Prints one line saying which, as `d2lft.course_dataset` does.
    """
    from d2lft.datasets import DatasetNotAvailableError, get_dataset
    from d2lft.synthetic import make_shapes

    try:
        path = get_dataset("eurosat_small", root=root)
        message = f"Using the EuroSAT tiles (eurosat_small) at {path}"
    except DatasetNotAvailableError as err:
        path = make_shapes(get_dataset("shapes", root=root).parent, shifted=True, image_size=64)
        message = (f"EuroSAT tiles unavailable ({err.reason}): using the generated 'shifted shapes' at {path}. "
                   f"For the tiles, set D2LFT_DATA_DIR to a folder holding eurosat_small/ (the course's shared data).")
    if verbose:
        print(message)
    return path


def glue(**values: Any) -> None:
    """myst-nb's ``glue(name, value, display=False)`` for each keyword: the page shows them in the prose."""
    from myst_nb import glue as myst_glue

    for name, value in values.items():
        myst_glue(name, value, display=False)


def table(rows: Sequence[Mapping[str, Any]], *, digits: int = 3):
    """A list of dicts (one per row, the same keys) as a Markdown table; floats get `digits` decimals."""
    from IPython.display import Markdown

    def cell(value: Any) -> str:
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(row[k]) for k in header) + " |" for row in rows]
    return Markdown("\n".join(lines))


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of results over seeds.

    >>> [round(x, 3) for x in mean_sd([0.9, 0.92, 0.94])]
    [0.92, 0.02]
    """
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pm(values: Sequence[float], *, digits: int = 3) -> str:
    """Results over seeds as the text "mean ± sd", for tables and prose.

    >>> pm([0.9, 0.92, 0.94])
    '0.920 ± 0.020'
    """
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


@dataclass(frozen=True)
class Difference:
    """How much one setting beats another across seeds, and whether that is larger than the noise."""

    mean: float  # mean over seeds of a[i] - b[i]
    sd: float  # their sample standard deviation
    clear: bool  # |mean| larger than sd and than the floor

    def __str__(self) -> str:
        """The difference as the prose shows it, signed: "+0.035 ± 0.023"."""
        return f"{self.mean:+.3f} ± {self.sd:.3f}"

    def say(self, more: str, less: str, same: str) -> str:
        """`more` when a is clearly larger, `less` when clearly smaller, `same` when within the noise."""
        if not self.clear:
            return same
        return more if self.mean > 0 else less


def paired_difference(a: Sequence[float], b: Sequence[float], *, floor: float = 0.0) -> Difference:
    """Mean and sd of the per-seed differences ``a[i] - b[i]`` (run i of both used seed i).

    The difference is *clear* when its mean is larger, in size, than both its standard deviation
    across seeds and `floor` (say, one validation image): with three seeds a rough screen for
    noise, not a significance test. Chapters glue ``say(...)`` so their prose stays true on any run.

    >>> d = paired_difference([0.90, 0.92, 0.95], [0.85, 0.86, 0.88])
    >>> round(d.mean, 3), d.clear, d.say("beats", "trails", "ties with"), str(d)
    (0.06, True, 'beats', '+0.060 ± 0.010')
    >>> paired_difference([0.90, 0.80, 0.85], [0.85, 0.86, 0.84]).say("beats", "trails", "ties with")
    'ties with'
    """
    if len(a) != len(b) or not a:
        raise ConfigError(f"paired_difference: expected two equally long, non-empty lists, got {len(a)} and {len(b)}")
    mean, sd = mean_sd([x - y for x, y in zip(a, b)])
    return Difference(mean=mean, sd=sd, clear=abs(mean) > max(sd, floor))
