"""The one base class of every error a user can cause and fix; the CLI prints exactly these in one line (exit 2).

Anything else that escapes a command is a bug in the harness and keeps its traceback. This module
imports nothing from the harness, so every layer (attacks/, defenses/, bench/) may raise its own
subclass without an import cycle.
"""
from __future__ import annotations

__all__ = ["UserError", "ConfigError"]


class UserError(Exception):
    """Bad input, a damaged or missing file, a full disk, an impossible setting: the message names it and the fix.

    Subclasses also derive from the built-in exception that fits (ValueError, KeyError, RuntimeError,
    ...) so code that catches those keeps working.
    """


class ConfigError(UserError, ValueError):
    """A malformed profile or parameter; the message names the offending key and the fix."""
