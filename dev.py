#!/usr/bin/env python3
"""Developer entry point for taskcenter: the one script that humans and .ci/run both call.

Standard library only, so it runs on a fresh machine that has nothing but Python 3.11+.

Usage:
  python3 dev.py demo [ARGS...]           run `taskcenter demo ARGS` (taskcenter at work on a throw-away database)
  python3 dev.py serve [ARGS...]          run `taskcenter serve ARGS` (embedded service on SQLite)
  python3 dev.py test [--no-lint] [--pg] [PYTEST ARGS...]
                                          ruff, ruff format --check, mypy, lint-imports, then pytest
      --no-lint   skip the static checks (quick iteration)
      --pg        set TASKCENTER_TEST_PG_URL to postgresql://postgres@127.0.0.1:5432/test if unset,
                  which switches on the PostgreSQL leg of the test suite
      --          everything after it goes to pytest untouched
  python3 dev.py bench NAME [ARGS...]     run bench/NAME.py with the project's virtualenv
  python3 dev.py lock [UV ARGS...]        regenerate requirements-dev.lock (e.g. --upgrade)

Every command first makes sure .venv exists and holds exactly requirements-dev.lock plus the project itself
(editable). The install is skipped while .venv/.stamp holds the sha256 of the lock file and pyproject.toml.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
LOCK = ROOT / "requirements-dev.lock"
PYPROJECT = ROOT / "pyproject.toml"
STAMP = VENV / ".stamp"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
LINT_PATHS = ("src", "tests", "bench")
# The exact command the lock's header records; `dev.py lock` must reproduce it so diffs stay small.
LOCK_COMMAND = (
    "pip",
    "compile",
    "pyproject.toml",
    "--extra",
    "dev",
    "--python-version",
    "3.11",
    "--generate-hashes",
    "-o",
    "requirements-dev.lock",
)
PYTEST_NO_TESTS = 5


class DevError(Exception):
    """An expected failure: reported as one line, then dev.py exits with `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def say(message: str) -> None:
    """Print a dev.py line, flushed so it lands in order with the subprocesses' output."""
    print(message, flush=True)


def venv_exe(name: str) -> Path:
    """Path of an executable installed in the project's virtualenv."""
    if os.name == "nt":
        return VENV / "Scripts" / f"{name}.exe"
    return VENV / "bin" / name


def venv_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of an activated .venv, so tools that spawn `python` or `taskcenter` find ours."""
    env = dict(os.environ)
    env["VIRTUAL_ENV"] = str(VENV)
    env["PATH"] = os.pathsep.join([str(venv_exe("python").parent), env.get("PATH", "")])
    env.pop("PYTHONHOME", None)
    # Nobody answers prompts in CI (no stdin), and the version nag is noise.
    env.setdefault("PIP_NO_INPUT", "1")
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    if extra:
        env.update(extra)
    return env


def run(argv: Sequence[str | Path], env: dict[str, str] | None = None) -> int:
    """Run a command in the repository root and return its exit code."""
    try:
        # The developer's own command line, not untrusted input.
        return subprocess.run(  # noqa: S603
            [str(a) for a in argv], cwd=ROOT, env=env or venv_env(), check=False
        ).returncode
    except FileNotFoundError:
        raise DevError(f"{argv[0]} not found") from None


def step(title: str, argv: Sequence[str | Path], env: dict[str, str] | None = None) -> None:
    """Run one named step, printing its header; a failing step stops dev.py with the step's exit code."""
    say(f"==> {title}")
    code = run(argv, env)
    if code != 0:
        raise DevError(f"{title} failed (exit {code})", code)


def inputs_digest() -> str:
    """sha256 of the lock file followed by pyproject.toml: what the installed venv must match."""
    digest = hashlib.sha256()
    for path in (LOCK, PYPROJECT):
        try:
            digest.update(path.read_bytes())
        except FileNotFoundError:
            raise DevError(f"{path.name} is missing from {ROOT}") from None
    return digest.hexdigest()


@contextlib.contextmanager
def venv_lock() -> Iterator[None]:
    """Hold an exclusive lock on .venv so two dev.py runs never install into it at once."""
    VENV.mkdir(exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no flock; concurrent installs are the user's lookout there.
        yield
        return
    with open(VENV / ".dev.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def create_venv() -> None:
    """Create .venv with the running interpreter unless it already has a working python."""
    python = venv_exe("python")
    if python.exists() or python.is_symlink():  # a dangling link: the interpreter it pointed at is gone
        try:
            probe = subprocess.run([str(python), "-c", "pass"], capture_output=True, check=False)  # noqa: S603
        except OSError:
            probe = None
        if probe is not None and probe.returncode == 0:
            return
        raise DevError(f"{VENV} is broken (its python does not run): delete it and run dev.py again")
    say(f"==> creating {VENV.name} with Python {sys.version.split()[0]}")
    # Into the existing (lock-holding) directory: venv populates it without clearing.
    code = run([sys.executable, "-m", "venv", VENV], env=dict(os.environ))
    if code != 0 or not python.exists():
        raise DevError(f"creating {VENV} failed (exit {code})", code or 1)


def install_quietly(argv: Sequence[str | Path]) -> bool:
    """Run an installer with its output held back, shown only if it fails: pip warns a lot."""
    try:
        done = subprocess.run(  # noqa: S603 - fixed installer command lines
            [str(a) for a in argv], cwd=ROOT, env=venv_env(), capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise DevError(f"{argv[0]} not found") from None
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
    return done.returncode == 0


def install(digest: str) -> None:
    """Install the lock and the project (editable) into .venv, with uv when the venv has it, else pip."""
    python = venv_exe("python")
    uv = venv_exe("uv")
    lock_args = ["install", "--require-hashes", "-r", LOCK.name]
    project_args = ["install", "--no-deps", "-e", "."]
    started = time.monotonic()
    installed = False
    if uv.exists():
        say("==> installing requirements-dev.lock and taskcenter into .venv (uv)")
        python_opt = ["--python", str(python)]
        installed = install_quietly([uv, "pip", *lock_args, *python_opt]) and install_quietly(
            [uv, "pip", *project_args, *python_opt]
        )
        if not installed:
            # uv ignores pip's configuration (local wheel directories, mirrors): pip may still succeed.
            say("dev.py: uv install failed; retrying with pip")
    if not installed:
        say("==> installing requirements-dev.lock and taskcenter into .venv (pip; ~30 s on a fresh venv)")
        pip: list[str | Path] = [python, "-m", "pip"]
        installed = install_quietly([*pip, *lock_args]) and install_quietly([*pip, *project_args])
        if not installed:
            raise DevError(f"installing dependencies into {VENV.name} failed (pip's output above)")
    STAMP.write_text(digest + "\n")
    say(f"    installed in {time.monotonic() - started:.1f}s")


def ensure_venv() -> None:
    """Make .venv hold exactly the locked dependencies and the project; reinstall only when inputs change."""
    digest = inputs_digest()
    with venv_lock():
        create_venv()
        try:
            current = STAMP.read_text().strip()
        except FileNotFoundError:
            current = ""
        if current != digest:
            install(digest)


def exec_in_venv(executable: Path, args: Sequence[str]) -> None:
    """Replace dev.py with a venv program, so signals and the exit code belong to that program."""
    if not executable.exists():
        raise DevError(f"{executable} not found: is the project installed in {VENV.name}?")
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(ROOT)
    os.execve(executable, [str(executable), *args], venv_env())  # noqa: S606 - no shell wanted


def cmd_demo(args: list[str]) -> int:
    """`dev.py demo`: show taskcenter at work, on a database of its own that it removes afterwards."""
    ensure_venv()
    exec_in_venv(venv_exe("taskcenter"), ["demo", *args])
    return 0  # not reached: exec replaced this process


def cmd_serve(args: list[str]) -> int:
    """`dev.py serve`: start the embedded service."""
    ensure_venv()
    exec_in_venv(venv_exe("taskcenter"), ["serve", *args])
    return 0  # not reached: exec replaced this process


def split_test_args(args: list[str]) -> tuple[bool, bool, list[str]]:
    """Take dev.py's own options (--no-lint, --pg) off the front; the rest goes to pytest."""
    lint, pg, pytest_args = True, False, []
    for index, arg in enumerate(args):
        if arg == "--":
            pytest_args.extend(args[index + 1 :])
            break
        if arg == "--no-lint":
            lint = False
        elif arg == "--pg":
            pg = True
        else:
            pytest_args.append(arg)
    return lint, pg, pytest_args


def cmd_test(args: list[str]) -> int:
    """`dev.py test`: static checks, then pytest; returns pytest's exit code."""
    lint, pg, pytest_args = split_test_args(args)
    ensure_venv()
    extra: dict[str, str] = {}
    if pg and not os.environ.get("TASKCENTER_TEST_PG_URL"):
        extra["TASKCENTER_TEST_PG_URL"] = DEFAULT_PG_URL
    env = venv_env(extra)
    if lint:
        # A fresh clone has no empty folders, so bench/ or tests/ may not exist yet.
        paths = [p for p in LINT_PATHS if (ROOT / p).is_dir()]
        step(f"ruff check {' '.join(paths)}", [venv_exe("ruff"), "check", *paths], env)
        step(f"ruff format --check {' '.join(paths)}", [venv_exe("ruff"), "format", "--check", *paths], env)
        step("mypy", [venv_exe("mypy")], env)
        step("lint-imports", [venv_exe("lint-imports")], env)
    pg_url = env.get("TASKCENTER_TEST_PG_URL")
    title = f"pytest (PostgreSQL: {pg_url})" if pg_url else "pytest (PostgreSQL leg off)"
    say(f"==> {title}")
    code = run([venv_exe("python"), "-m", "pytest", *pytest_args], env)
    if code == PYTEST_NO_TESTS:
        raise DevError("pytest ran no tests (exit 5)", code)
    if code != 0:
        raise DevError(f"pytest failed (exit {code})", code)
    return 0


def cmd_bench(args: list[str]) -> int:
    """`dev.py bench NAME`: run bench/NAME.py with the venv's python."""
    if not args or args[0].startswith("-"):
        raise DevError("usage: dev.py bench NAME [ARGS...]", 2)
    name = args[0].removesuffix(".py")
    script = ROOT / "bench" / f"{name}.py"
    if not script.is_file():
        available = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))
        raise DevError(f"no benchmark {name!r}; available: {', '.join(available) or 'none'}", 2)
    ensure_venv()
    exec_in_venv(venv_exe("python"), [str(script.relative_to(ROOT)), *args[1:]])
    return 0  # not reached


def cmd_lock(args: list[str]) -> int:
    """`dev.py lock`: regenerate requirements-dev.lock with uv (installed into .venv on first use)."""
    with venv_lock():
        create_venv()
        uv = venv_exe("uv")
        if not uv.exists():
            say("==> installing uv into .venv")
            if not install_quietly([venv_exe("python"), "-m", "pip", "install", "uv"]):
                raise DevError("installing uv into .venv failed (pip's output above)")
    before = LOCK.read_bytes() if LOCK.exists() else b""
    # --quiet keeps uv from echoing the whole lock to the terminal; uv leaves it out of the lock's header.
    step("uv pip compile -> requirements-dev.lock", [uv, *LOCK_COMMAND, "--quiet", *args])
    if LOCK.read_bytes() == before:
        say("    lock unchanged")
    else:
        say("    lock updated (review with `git diff requirements-dev.lock`); the next run reinstalls .venv")
    return 0


COMMANDS = {"demo": cmd_demo, "serve": cmd_serve, "test": cmd_test, "bench": cmd_bench, "lock": cmd_lock}


def main(argv: list[str]) -> int:
    """Dispatch a subcommand; expected failures become one line on stderr and a non-zero exit code."""
    # Whatever python3 a fresh machine has runs this file, so the project's floor is checked, not assumed.
    if sys.version_info < (3, 11):  # noqa: UP036
        print("dev.py: taskcenter needs Python 3.11 or newer", file=sys.stderr)
        return 1
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.split("\n\n", 2)[2], file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"dev.py: unknown command {argv[0]!r} (try: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        return command(argv[1:])
    except DevError as error:
        print(f"dev.py: {error}", file=sys.stderr, flush=True)
        return error.code
    except KeyboardInterrupt:
        print("dev.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
