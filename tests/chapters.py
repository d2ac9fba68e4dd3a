"""A pytest plugin (`-p chapters`): each chapter runs once and passes when all its cells run.

The book build (``jupyter-book build``, ``execute_notebooks: cache``) and pytest share one
jupyter-cache (``_build/.jupyter_cache``). Whichever runs a chapter first executes it in a fresh
kernel and stores the executed notebook; the other finds the stored run of the same code and
reuses it instead of executing the chapter a second time. A failing cell fails the build and the
test alone (failed runs are never stored), so both guarantees hold with one execution per chapter:
the HTML shows what ran, and a failing cell or assert fails the tests. Edit a code cell, or any
file of the d2lft package after the stored run, and the chapter runs again (and replaces the
stored run, so the next build shows it).

Under ``pytest -n N`` (pytest-xdist) the chapters are collected first, the longest first, so they
start early and spread over the N worker processes; every kernel or command a worker starts uses
one thread (`pytest_configure` below), and one lock keeps two workers from writing the store at once.
"""
from __future__ import annotations

import os
import time
from datetime import timezone
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "_build" / ".jupyter_cache"
PACKAGE = REPO / "d2lft"
TIMEOUT = 600  # seconds per cell, as the book build allows


def pytest_collect_file(file_path: Path, parent):
    if file_path.suffix == ".ipynb" and not file_path.name.startswith("."):
        return ChapterFile.from_parent(parent, path=file_path)
    return None


class ChapterFile(pytest.File):
    def collect(self):
        yield ChapterRun.from_parent(self, name="runs")


class ChapterRun(pytest.Item):
    """Every cell of one chapter, executed top to bottom in one kernel (or that run, stored by the build)."""

    def runtest(self) -> None:
        import nbformat
        from jupyter_cache import get_cache
        from jupyter_cache.base import CacheBundleIn
        from jupyter_cache.executors.utils import single_nb_execution

        notebook = nbformat.read(self.path, as_version=4)
        with _store_lock():
            cache = get_cache(str(CACHE))
            try:
                record = cache.match_cache_notebook(notebook)
            except KeyError:
                record = None
        if record is not None and _stored_after_the_package_changed(record):
            # the build (or an earlier pytest) ran exactly this code on this package: nothing to redo
            seconds = record.data.get("execution_seconds")
            self.add_report_section("call", "chapter", f"reused the stored run ({seconds or 0:.0f} s), ID={record.pk}")
            return
        start = time.perf_counter()
        result = single_nb_execution(notebook, cwd=str(self.path.parent), allow_errors=False, timeout=TIMEOUT,
                                     meta_override=True)
        if result.err is not None:
            raise ChapterFailed(result.exc_string or repr(result.err))
        if not _has_figures(notebook):  # the build would show this run: refuse to store a chapter without them
            raise ChapterFailed("every cell ran, but no figure reached the outputs: the kernel did not use "
                                "matplotlib's inline backend (is MPLBACKEND set in its environment?)")
        with _store_lock():
            cache.cache_notebook_bundle(CacheBundleIn(notebook, str(self.path), data={"execution_seconds": result.time}),
                                        check_validity=False, overwrite=True)
        self.add_report_section("call", "chapter", f"executed in {time.perf_counter() - start:.0f} s")

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ChapterFailed):
            return f"{self.path.name}: a cell failed\n{excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.path.name}: every cell runs"


def pytest_configure(config) -> None:
    """In a pytest-xdist worker (pytest -n N) every chapter kernel and command it starts runs on one thread.

    N workers share the cores: two processes of two threads each on two cores stall each other.
    (A plugin, not tests/conftest.py: this file is loaded in every worker, whatever the arguments.)
    """
    if hasattr(config, "workerinput"):
        os.environ["OMP_NUM_THREADS"] = "1"


def pytest_collection_modifyitems(items) -> None:
    """The chapters first, the one with the most code first: under ``pytest -n N`` the long runs start early."""
    chapters = sorted((item for item in items if isinstance(item, ChapterRun)), key=_code_size, reverse=True)
    items[:] = chapters + [item for item in items if not isinstance(item, ChapterRun)]


def _code_size(item: ChapterRun) -> int:
    import nbformat

    notebook = nbformat.read(item.path, as_version=4)
    return sum(len(cell.source) for cell in notebook.cells if cell.cell_type == "code")


def _has_figures(notebook) -> bool:
    return any("image/png" in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.get("outputs", []))


def _store_lock():
    """A lock across processes (pytest -n N) around reading and writing the store."""
    from filelock import FileLock

    CACHE.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(CACHE.parent / ".jupyter_cache.lock"))


class ChapterFailed(Exception):
    """A cell of the chapter raised (an error, or a hidden assert that no longer holds)."""


def _stored_after_the_package_changed(record) -> bool:
    """True when the stored run is newer than every source file of d2lft (jupyter-cache stores UTC)."""
    created = record.created
    if created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    newest = max((p.stat().st_mtime for p in PACKAGE.rglob("*.py")), default=0.0)
    return created.timestamp() >= newest
