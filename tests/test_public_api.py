"""The public API surface: a sorted, complete ``__all__`` (httpx ``test_exported_members``), and a light import."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

import taskcenter

#: Dunder names that are part of the public surface on purpose.
PUBLIC_DUNDERS = frozenset({"__version__"})
#: What ``import taskcenter`` must not load: the web framework, the server, the CLI and their own modules.
HEAVY = ("fastapi", "starlette", "uvicorn", "typer", "taskcenter.api", "taskcenter.cli")


def test_all_is_sorted() -> None:
    assert taskcenter.__all__ == sorted(taskcenter.__all__)


def test_all_has_no_duplicates() -> None:
    assert len(set(taskcenter.__all__)) == len(taskcenter.__all__)


@pytest.mark.parametrize("name", taskcenter.__all__)
def test_every_exported_name_is_importable(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from taskcenter import {name}", namespace)  # noqa: S102 - the statement is built from __all__ itself
    assert namespace[name] is getattr(taskcenter, name)


def test_every_public_name_defined_in_the_package_is_exported() -> None:
    """Submodules are reached by their path (``taskcenter.errors``), so they are not part of ``__all__``."""
    defined = {
        name
        for name, value in vars(taskcenter).items()
        if (not name.startswith("_") or name in PUBLIC_DUNDERS)
        and not (isinstance(value, types.ModuleType) and value.__name__.startswith("taskcenter."))
    }
    assert defined == set(taskcenter.__all__)


def test_the_library_entry_points_are_exported() -> None:
    """DESIGN "Library": ``from taskcenter import TaskCenter, RetryPolicy``."""
    assert {"TaskCenter", "RetryPolicy", "Task", "Attempt", "TaskCenterError"} <= set(taskcenter.__all__)


def test_exported_exceptions_share_the_one_root() -> None:
    exceptions = [v for v in (getattr(taskcenter, n) for n in taskcenter.__all__) if isinstance(v, type)]
    errors = [e for e in exceptions if issubclass(e, BaseException)]
    assert errors
    assert all(issubclass(e, taskcenter.TaskCenterError) for e in errors)


def test_version_is_the_package_version() -> None:
    from importlib.metadata import version

    assert taskcenter.__version__ == version("taskcenter")


def test_importing_taskcenter_does_not_load_the_web_stack_or_the_cli() -> None:
    """Checked in a fresh interpreter: this test process has imported plenty already."""
    code = "import sys, taskcenter; print(','.join(m for m in sys.argv[1:] if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code, *HEAVY], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
