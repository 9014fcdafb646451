"""Run real ``taskcenter worker`` processes for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TASKCENTER = str(Path(sys.executable).with_name("taskcenter"))


class WorkerProcess:
    """A ``taskcenter worker`` subprocess with its own environment; stderr is kept for diagnostics."""

    def __init__(self, db_url: str, *, concurrency: int = 20, **settings: Any) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKCENTER_")}
        env.update(
            TASKCENTER_DATABASE_URL=db_url,
            TASKCENTER_ALLOW_NETWORKS="127.0.0.0/8",
            TASKCENTER_CONCURRENCY=str(concurrency),
            TASKCENTER_LOG_FORMAT="json",
        )
        for key, value in settings.items():
            env[f"TASKCENTER_{key.upper()}"] = str(value)
        self.proc = subprocess.Popen(
            [TASKCENTER, "worker"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def terminate(self, timeout: float = 20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def output(self) -> str:
        if self.proc.poll() is None:
            return ""
        out, err = self.proc.communicate(timeout=5)
        return (out or "") + (err or "")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = 10) -> None:
        """Give the interpreter time to start and the dispatcher to claim its first batch."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"worker died at start:\n{self.output()}")
            time.sleep(0.1)
            return
