"""The chapters' explorers as a learner uses them: JupyterLab in headless Chromium, a slider dragged by the mouse.

Each test copies the cells of one chapter that its explorer needs (tagged ``explorer-setup`` and
``explorer`` in the notebook's cell metadata) into a fresh notebook, opens it in a real JupyterLab
server, runs it from the Run menu, drags one slider of the explorer and checks that the figure
changed. Skipped, with the reason, without JupyterLab, Playwright or Debian's Chromium
(``apt-get install chromium``).
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright's own browser download needs the internet
RUN_SECONDS = 300  # the set-up cells import torch and cache the photos: about half a minute on an idle 2-core CPU

# chapter, the slider to drag (its label) and where to drop it (fraction of the track)
EXPLORERS = {
    "augmentation": ("06_augmentation.ipynb", "rotation (deg)", 0.5),
    "schedule": ("04_learning_rates.ipynb", "warmup epochs", 0.6),
    "freeze": ("03_freezing.ipynb", "train last k blocks", 0.8),
}


def explorer_notebook(chapter: Path) -> dict:
    """`chapter` reduced to its cells tagged ``explorer-setup`` followed by the one tagged ``explorer``."""
    notebook = json.loads(chapter.read_text())
    tagged = [(cell, cell.get("metadata", {}).get("tags", [])) for cell in notebook["cells"]]
    setup = [cell for cell, tags in tagged if "explorer-setup" in tags]
    explorer = [cell for cell, tags in tagged if "explorer" in tags]
    if len(explorer) != 1 or not setup:
        raise AssertionError(
            f"{chapter}: expected one cell tagged 'explorer' and the cells it needs tagged 'explorer-setup' "
            f"(found {len(explorer)} and {len(setup)}); add the tags in the cells' metadata"
        )
    cells = [{**cell, "outputs": [], "execution_count": None} for cell in [*setup, *explorer]]
    return {**notebook, "cells": cells}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Lab:
    url: str
    token: str
    root: Path
    log: Path

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    """A JupyterLab server on 127.0.0.1 (free port, random token) serving a temporary folder."""
    pytest.importorskip("jupyterlab", reason='JupyterLab is not installed: pip install -e ".[dev]"')
    base = tmp_path_factory.mktemp("lab")
    root, settings = base / "root", base / "settings"
    root.mkdir()
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        # The kernel imports this checkout's d2lft and draws with the notebook's own backend.
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "JUPYTER_CONFIG_DIR": str(settings / "config"),
        "JUPYTER_RUNTIME_DIR": str(settings / "runtime"),
    }
    env.pop("MPLBACKEND", None)
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        f"--LabApp.user_settings_dir={settings / 'user'}", f"--LabApp.workspaces_dir={settings / 'workspaces'}",
    ]
    if os.geteuid() == 0:  # CI containers run as root, which JupyterLab refuses unless told
        command.append("--allow-root")
    # No "get notified about Jupyter news?" pop-up over the page (it would also ask the internet).
    news = settings / "user" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    log = base / "jupyterlab.log"
    with log.open("w") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    lab = Lab(url=f"http://127.0.0.1:{port}", token=token, root=root, log=log)
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None:
                raise AssertionError(f"JupyterLab exited with status {server.returncode}:\n{lab.log_tail()}")
            try:
                with urllib.request.urlopen(f"{lab.url}/api/status?token={token}", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"JupyterLab did not answer on {lab.url} within 90 s:\n{lab.log_tail()}")
            time.sleep(0.5)
        yield lab
    finally:
        _stop(server)


def _stop(server: subprocess.Popen) -> None:
    """Stop the server; on SIGTERM it shuts down its kernels (and a kernel whose server died exits too)."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    except ProcessLookupError:  # it had exited already
        server.wait()


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, driven by Playwright."""
    if not CHROMIUM.exists():
        pytest.skip(f"no browser at {CHROMIUM}: install Debian's chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason='Playwright is not installed: pip install -e ".[dev]"')
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


def _figure(cell) -> str:
    """The explorer's current figure: the src (a PNG data URL) of the image in its Output widget."""
    image = cell.locator(".widget-output img")
    image.wait_for(state="visible")
    return image.get_attribute("src")


def _stderr(page) -> list[str]:
    """What the notebook's cells wrote to stderr: warnings and tracebacks."""
    outputs = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    return [outputs.nth(i).inner_text() for i in range(outputs.count())]


@pytest.mark.parametrize("chapter", sorted({chapter for chapter, _, _ in EXPLORERS.values()}))
def test_each_explorer_chapter_tags_the_cells_its_explorer_needs(chapter):
    """Fast and browser-free: the tags this file relies on are still in the chapters."""
    cells = explorer_notebook(REPO / "book" / chapter)["cells"]
    assert "explorer(" in "".join(cells[-1]["source"]), f"{chapter}: the cell tagged 'explorer' shows no explorer"


@pytest.mark.browser
@pytest.mark.xdist_group("jupyterlab")  # pytest -n N --dist loadgroup: one worker, one JupyterLab server
@pytest.mark.parametrize("name", list(EXPLORERS))
def test_dragging_a_slider_redraws_the_explorer(name, browser, lab, tmp_path):
    chapter, slider_label, drop_at = EXPLORERS[name]
    notebook = f"{name}_explorer.ipynb"
    (lab.root / notebook).write_text(json.dumps(explorer_notebook(REPO / "book" / chapter), indent=1))

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)
    try:
        # A workspace of its own: JupyterLab would otherwise reopen the previous tests' notebooks.
        page.goto(f"{lab.url}/lab/workspaces/{name}/tree/{notebook}?token={lab.token}")
        # Run only once the kernel is up: earlier, JupyterLab asks which kernel to start and runs nothing.
        page.locator(".jp-StatusBar-TextItem", has_text="| Idle").wait_for(timeout=120_000)

        # Run > Run All Cells, as the README tells a learner.
        page.locator(".lm-MenuBar-item", has_text="Run").first.click()
        page.locator(".lm-Menu-item", has_text="Run All Cells").first.click()

        # Wait for the explorer's slider, or stop at the first cell that fails.
        cell = page.locator(".jp-Notebook .jp-CodeCell").last
        slider = cell.locator(".widget-slider", has=page.locator("label", has_text=slider_label))
        failed = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                              has_text="Traceback")
        try:
            slider.or_(failed).first.wait_for(timeout=RUN_SECONDS * 1000)
        except Exception as error:  # Playwright's TimeoutError
            page.screenshot(path=tmp_path / "timeout.png")
            raise AssertionError(f"{chapter}: no {slider_label!r} slider after {RUN_SECONDS} s; cells' stderr: "
                                 f"{_stderr(page)}\nJupyterLab's log:\n{lab.log_tail()}") from error
        assert not failed.count(), f"{chapter}: a cell the explorer needs failed:\n" + "\n".join(_stderr(page))
        before = _figure(cell)
        assert before.startswith("data:image/png;base64,")
        readout = slider.locator(".widget-readout")
        value_before = readout.inner_text()
        cell.screenshot(path=tmp_path / "before.png")

        # Drag the handle along the track with the mouse; the slider updates on release.
        track = slider.locator(".noUi-base").bounding_box()
        handle = slider.locator(".noUi-handle").bounding_box()
        page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
        page.mouse.down()
        page.mouse.move(track["x"] + drop_at * track["width"], track["y"] + track["height"] / 2, steps=10)
        page.mouse.up()

        deadline = time.monotonic() + 60
        while (after := _figure(cell)) == before and time.monotonic() < deadline:
            time.sleep(0.25)
        cell.screenshot(path=tmp_path / "after.png")
        page.screenshot(path=tmp_path / "page.png")
        assert readout.inner_text() != value_before, f"dragging {slider_label!r} did not move the slider"
        assert after != before, f"{chapter}: moving {slider_label!r} to {readout.inner_text()} left the figure as it was"
        assert base64.b64decode(after.split(",", 1)[1]).startswith(b"\x89PNG")
    finally:
        page.close()
        _shut_down_kernels(lab)


def _shut_down_kernels(lab: Lab) -> None:
    """Free the memory of the notebook's kernel before the next test starts its own."""
    headers = {"Authorization": f"token {lab.token}"}
    with urllib.request.urlopen(urllib.request.Request(f"{lab.url}/api/kernels", headers=headers)) as answer:
        kernels = json.load(answer)
    for kernel in kernels:
        request = urllib.request.Request(f"{lab.url}/api/kernels/{kernel['id']}", method="DELETE", headers=headers)
        urllib.request.urlopen(request).close()
