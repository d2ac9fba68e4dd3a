"""d2lft: fine-tune pretrained vision models with PyTorch (the package behind the d2lft course).

The core API, one screen::

    import d2lft as ft
    root = ft.course_dataset()
    net = ft.create_model("efficientnet_lite0", num_classes=2)
    data = ft.image_folders(root, net)           # prepared as the model's weights expect
    history = ft.fine_tune(net, data, strategy="lp-ft", epochs=3)

Plots and widgets load on first use (``ft.plot.plot_history(history)``,
``ft.widgets.freeze_explorer(net)``), so ``import d2lft`` needs neither matplotlib nor ipywidgets.

>>> import d2lft as ft
>>> net = ft.create_model("efficientnet_lite0", num_classes=2)   # real ImageNet weights, offline
>>> ft.count_parameters(net)[0] > 3_000_000
True
"""
from __future__ import annotations

import importlib

from d2lft import calibration  # ft.calibration.reliability, .expected_calibration_error, .fit_temperature
from d2lft.averaging import EMA, greedy_soup, interpolate, uniform_soup
from d2lft.callbacks import EarlyStopping
from d2lft.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from d2lft.data import ImageFolderData, image_folders
from d2lft.datasets import DatasetNotAvailableError, course_dataset, get_dataset, list_datasets
from d2lft.device import get_device, set_seed
from d2lft.download import DownloadError
from d2lft.ensemble import average_predictions
from d2lft.errors import ConfigError, D2LFTError
from d2lft.features import domain_shift, extract_features, feature_loaders, probe
from d2lft.freeze import (GradualUnfreezing, count_parameters, freeze, freeze_batchnorm, set_train_mode,
                          train_bias_and_norm, train_blocks, train_last, trainable_blocks, unfreeze)
from d2lft.images import BadImageError, is_image_file, load_image
from d2lft.imbalance import balanced_sampler, class_counts, class_weights, imbalanced_subset
from d2lft.inference import TTA, classify
from d2lft.metrics import accuracy, balanced_accuracy, confusion_matrix, per_class_recall
from d2lft.models import WeightsUnavailableError, create_model, list_models, replace_head, summary
from d2lft.net import Net, Preprocessing
from d2lft.optim import LRFindResult, lr_find, make_optimizer, make_scheduler, param_groups, schedule_curve
from d2lft.peft import add_lora, merge_lora
from d2lft.recipes import STRATEGIES, fine_tune
from d2lft.train import History, evaluate, fit, predict
from d2lft.transforms import AUGMENT_PRESETS, mix_collate, train_transform

__version__ = "0.1.0"

__all__ = [
    # data
    "course_dataset", "get_dataset", "list_datasets", "image_folders", "ImageFolderData", "train_transform",
    "AUGMENT_PRESETS", "load_image", "is_image_file",
    # models
    "Net", "Preprocessing", "create_model", "replace_head", "summary", "list_models", "classify",
    # freezing and learning rates
    "freeze", "unfreeze", "train_last", "train_blocks", "freeze_batchnorm", "set_train_mode", "count_parameters",
    "trainable_blocks", "GradualUnfreezing", "param_groups", "make_optimizer", "make_scheduler", "schedule_curve",
    "lr_find", "LRFindResult",
    # training and evaluation
    "fit", "History", "EarlyStopping", "evaluate", "predict", "save_checkpoint", "load_checkpoint", "get_device",
    "set_seed", "extract_features", "feature_loaders", "probe", "domain_shift",
    # recipes
    "fine_tune", "STRATEGIES",
    # metrics, imbalance, ensembles
    "accuracy", "confusion_matrix", "per_class_recall", "balanced_accuracy", "class_counts", "class_weights",
    "balanced_sampler", "imbalanced_subset", "average_predictions",
    # the fine-tuning toolbox: averaging weights
    "EMA", "interpolate", "uniform_soup", "greedy_soup", "TTA", "mix_collate", "train_bias_and_norm", "add_lora",
    "merge_lora",
    # errors a user can fix
    "D2LFTError", "ConfigError", "BadImageError", "DownloadError", "DatasetNotAvailableError", "CheckpointError",
    "WeightsUnavailableError",
]

#: Submodules imported on first use, so that ``import d2lft`` (every CLI call, every torchrun
#: worker) does not load matplotlib or ipywidgets.
_ON_DEMAND = ("plot", "widgets", "book")


def __getattr__(name: str):
    if name in _ON_DEMAND:
        return importlib.import_module(f"d2lft.{name}")
    raise AttributeError(f"module 'd2lft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_ON_DEMAND])
