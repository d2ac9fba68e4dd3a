"""The one base class of the errors a user can fix.

Every exception d2lft raises for something the user controls (a folder, a file, a setting, the
network) derives from `D2LFTError`, and its message is one line that names the file or setting
and says what to do. The command line catches `D2LFTError`, prints that line and exits with
status 1; anything else is a bug and keeps its traceback.

>>> issubclass(ConfigError, ValueError) and issubclass(ConfigError, D2LFTError)
True
"""
from __future__ import annotations

__all__ = ["D2LFTError", "ConfigError"]


class D2LFTError(Exception):
    """An error the user can fix; ``str(err)`` is one line saying what and how."""


class ConfigError(D2LFTError, ValueError):
    """A setting, argument or folder layout that d2lft cannot use (also a ``ValueError``)."""
