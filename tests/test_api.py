"""The public API as the README prints it: one screen, preprocessing from the model, no plotting imports."""
from __future__ import annotations

import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import d2lft as ft
from d2lft.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_api_block() -> str:
    text = README.read_text()
    section = text[text.index("## The API in one screen"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_api_block_runs_as_printed_with_the_models_own_statistics(tmp_path, monkeypatch):
    monkeypatch.setenv("D2LFT_DATA_DIR", str(tmp_path))  # no photos here: the embedded set, generated
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {}
    exec(compile(readme_api_block(), "README.md", "exec"), namespace)
    net, data, history = namespace["net"], namespace["data"], namespace["history"]
    assert net.preprocessing.mean == (0.5, 0.5, 0.5) and net.preprocessing.std == (0.5, 0.5, 0.5)  # Lite0's
    assert data.preprocessing.mean == net.preprocessing.mean and data.preprocessing.std == net.preprocessing.std
    images, _ = next(iter(data.loader("val")))
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.min() < -0.5  # (x - 0.5) / 0.5, not ImageNet's
    raw = data.val_dataset.images[0].float() / 255
    crop = (raw.shape[-1] - data.image_size) // 2
    centre = raw[:, crop:crop + data.image_size, crop:crop + data.image_size]
    assert torch.allclose(data.val_dataset[0][0], (centre - 0.5) / 0.5, atol=1e-5)
    assert len(history) >= 1 and history.val_acc[-1] is not None


def test_import_d2lft_loads_neither_matplotlib_nor_ipywidgets():
    code = "import sys, d2lft; print(sorted(m for m in ('matplotlib', 'ipywidgets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_plots_and_widgets_load_on_first_use():
    assert ft.plot.plot_history.__module__ == "d2lft.plot"
    assert ft.widgets.freeze_explorer.__module__ == "d2lft.widgets"
    with pytest.raises(AttributeError, match="no attribute 'plot_history'"):
        ft.plot_history  # noqa: B018 - the old top-level name: one place for each name


def test_every_public_name_is_exported_and_documented():
    for name in ft.__all__:
        obj = getattr(ft, name)
        assert getattr(obj, "__doc__", None) or not callable(obj), name
    assert len(ft.__all__) == len(set(ft.__all__))


def test_offline_download_is_one_line_naming_the_folder_used(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("D2LFT_OFFLINE", "1")
    assert main(["data", "download", "hotdog", "--root", str(tmp_path / "mine")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(tmp_path / "mine" / "hotdog.zip") in err and str(tmp_path / "mine" / "hotdog" / "train") in err
    assert str(Path(ft.__file__).parent.parent / "data") not in err  # not the repository's data/ folder


def test_a_download_without_network_is_one_line_naming_the_folder_used(tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.delenv("D2LFT_OFFLINE", raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert main(["data", "download", "hotdog", "--root", str(tmp_path / "mine")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.count("by hand") == 1
    assert "name resolution" in err and str(tmp_path / "mine" / "hotdog.zip") in err
    assert ",." not in err and ". ." not in err  # the old message repeated itself with stray punctuation


def test_every_user_error_is_one_line(tmp_path, capsys):
    cases = [
        ["finetune", str(tmp_path / "nowhere")],
        ["finetune", str(tmp_path), "--image-size", "100000"],
        ["finetune", str(tmp_path), "--seed", str(2**70)],
        ["data", "download", "imagenet"],
    ]
    for args in cases:
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("d2lft "), (args, err)
