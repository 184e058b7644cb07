"""Issue 23: one base class for the errors a user can fix; the CLI turns exactly those into one line, exit 2."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import attacks
import bench
import defenses
from bench.cli import commands as cli
from bench.core.errors import UserError
from bench.execution.training import TrainingDivergedError


def harness_modules():
    """Every module of the harness's packages (bench, attacks, defenses), imported."""
    for package in (bench, attacks, defenses):
        yield package
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith("__main__"):
                continue
            yield importlib.import_module(info.name)


def harness_exceptions() -> set[type[BaseException]]:
    """The exception classes the harness defines (not those it imports; warnings are not errors)."""
    found = set()
    for module in harness_modules():
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if (issubclass(obj, BaseException) and not issubclass(obj, Warning)
                    and obj.__module__ == module.__name__):
                found.add(obj)
    return found


def test_every_error_the_harness_defines_is_a_user_error():
    found = harness_exceptions()
    assert len(found) >= 15  # config, registry, store, data, weights, plugins, attacks, bounds, training, ...
    outside = sorted(f"{cls.__module__}.{cls.__qualname__}" for cls in found if not issubclass(cls, UserError))
    assert outside == [], "derive these from bench.core.errors.UserError (or make them bugs that keep a traceback)"


def test_the_errors_module_imports_nothing_of_the_harness():
    source = inspect.getsource(importlib.import_module("bench.core.errors"))
    assert "import bench" not in source and "from bench" not in source


def _command_raising(monkeypatch, exc: BaseException) -> None:
    """Make `pixeldp-bench list` raise `exc`."""
    def boom(args):
        raise exc
    monkeypatch.setattr(cli, "load_plugins", lambda *a, **k: None)
    parser = cli.build_parser

    def build():
        built = parser()
        built.set_defaults(func=boom)
        for action in built._subparsers._group_actions:  # every subcommand runs `boom`
            for sub in action.choices.values():
                sub.set_defaults(func=boom)
        return built
    monkeypatch.setattr(cli, "build_parser", build)


def test_a_user_error_is_one_line_and_exit_2(monkeypatch, capsys):
    _command_raising(monkeypatch, TrainingDivergedError("training loss became nan at step 7; lower the learning rate"))
    assert cli.main(["list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pixeldp-bench: error: training loss became nan at step 7; lower the learning rate"]


@pytest.mark.parametrize("bug", [RuntimeError("a bug"), FloatingPointError("a bug"), ValueError("a bug"),
                                 KeyError("a bug")])
def test_a_bug_keeps_its_traceback(bug, monkeypatch):
    """Errors that are not UserErrors (a FloatingPointError from numpy, say) are not caught by accident."""
    _command_raising(monkeypatch, bug)
    with pytest.raises(type(bug), match="a bug"):
        cli.main(["list"])


def test_user_errors_keep_their_builtin_bases():
    """Callers that catch ValueError, KeyError or FloatingPointError keep working."""
    from bench.profile.config import ConfigError
    from bench.core.registry import UnknownNameError
    assert issubclass(ConfigError, ValueError) and issubclass(UnknownNameError, KeyError)
    assert issubclass(TrainingDivergedError, FloatingPointError)
