"""d2lft: fine-tune pretrained vision models with PyTorch (the package behind the d2lft course).

>>> import d2lft as ft
>>> net = ft.create_model("efficientnet_lite0", num_classes=2)   # real ImageNet weights, offline
>>> ft.count_parameters(net)[0] > 3_000_000
True
"""
from d2lft.data import (
    ImageFolderData,
    course_dataset,
    eval_transform,
    get_dataset,
    image_folders,
    list_datasets,
    train_transform,
)
from d2lft.download import DownloadError
from d2lft.ensemble import accuracy, average_predictions
from d2lft.features import extract_features, feature_loaders
from d2lft.freeze import (
    GradualUnfreezing,
    count_parameters,
    freeze,
    set_train_mode,
    train_last,
    trainable_blocks,
    unfreeze,
)
from d2lft.images import BadImageError, is_image_file, load_image
from d2lft.imbalance import (
    balanced_accuracy,
    balanced_sampler,
    class_counts,
    class_weights,
    imbalanced_subset,
    per_class_recall,
)
from d2lft.inference import classify
from d2lft.models import WeightsUnavailableError, create_model, list_models, replace_head, summary
from d2lft.net import IMAGENET_MEAN, IMAGENET_STD, Net
from d2lft.optim import SCHEDULERS, LRFindResult, lr_find, make_scheduler, param_groups, schedule_curve
from d2lft.plot import (
    confusion_matrix,
    plot_bars,
    plot_confusion_matrix,
    plot_filters,
    plot_history,
    plot_lr_find,
    plot_schedules,
    plot_trainable,
    show_images,
)
from d2lft.recipes import STRATEGIES, CourseSettings, course_settings, fine_tune, run_finetune
from d2lft.train import (
    CheckpointError,
    EarlyStopping,
    History,
    evaluate,
    fit,
    get_device,
    load_checkpoint,
    predict,
    save_checkpoint,
    set_seed,
)
from d2lft.widgets import augmentation_explorer, freeze_explorer, schedule_explorer

__version__ = "0.1.0"

__all__ = [
    # data
    "course_dataset", "get_dataset", "list_datasets", "image_folders", "ImageFolderData",
    "train_transform", "eval_transform", "load_image", "is_image_file", "BadImageError", "DownloadError",
    # models
    "Net", "create_model", "replace_head", "summary", "list_models", "classify", "WeightsUnavailableError",
    "IMAGENET_MEAN", "IMAGENET_STD",
    # freezing and learning rates
    "freeze", "unfreeze", "train_last", "set_train_mode", "count_parameters", "trainable_blocks",
    "GradualUnfreezing", "param_groups", "make_scheduler", "schedule_curve", "SCHEDULERS", "lr_find", "LRFindResult",
    # training
    "fit", "History", "EarlyStopping", "evaluate", "predict", "save_checkpoint", "load_checkpoint",
    "CheckpointError", "get_device", "set_seed", "extract_features", "feature_loaders",
    # recipes
    "fine_tune", "run_finetune", "STRATEGIES", "course_settings", "CourseSettings",
    "class_counts", "class_weights", "balanced_sampler", "imbalanced_subset", "per_class_recall",
    "balanced_accuracy", "average_predictions", "accuracy",
    # plots and widgets
    "plot_history", "plot_lr_find", "plot_schedules", "show_images", "confusion_matrix", "plot_confusion_matrix",
    "plot_filters", "plot_bars", "plot_trainable", "augmentation_explorer", "schedule_explorer", "freeze_explorer",
]
