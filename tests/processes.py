"""Run real ``taskcenter worker`` processes for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASKCENTER = str(Path(sys.executable).with_name("taskcenter"))


class WorkerProcess:
    """A ``taskcenter worker`` subprocess with its own environment; stderr is kept for diagnostics."""

    def __init__(
        self, db_url: str, *, concurrency: int = 20, args: Sequence[str] = (), **settings: Any
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKCENTER_")}
        env.update(
            TASKCENTER_DATABASE_URL=db_url,
            TASKCENTER_ALLOW_NETWORKS="127.0.0.0/8",
            TASKCENTER_CONCURRENCY=str(concurrency),
            TASKCENTER_LOG_FORMAT="json",
        )
        for key, value in settings.items():
            env[f"TASKCENTER_{key.upper()}"] = str(value)
        # Output goes to a file, not a pipe: an unread pipe fills at 64 KiB and blocks a chatty worker.
        self.log = tempfile.NamedTemporaryFile(prefix="tc-worker-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(
            [TASKCENTER, "worker", *args], env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def terminate(self, timeout: float = 20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def output(self) -> str:
        """Everything the worker printed so far."""
        return Path(self.log.name).read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = 30) -> None:
        """Block until the worker's dispatcher has started (it logs so)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"worker died at start:\n{self.output()}")
            if "started (concurrency" in self.output():
                return
            time.sleep(0.05)
        raise TimeoutError(f"worker not started within {timeout} s:\n{self.output()}")
