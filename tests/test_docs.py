"""The guides against the code they describe."""

from __future__ import annotations

import re
from pathlib import Path

from taskcenter.config import Settings, load_settings
from taskcenter.metrics import Metrics

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _documented_settings() -> set[str]:
    """The ``TASKCENTER_*`` names in the first column of operations.md's configuration table (``_X`` after a
    full name abbreviates ``TASKCENTER_X``)."""
    text = (DOCS / "operations.md").read_text()
    table = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split("|")[1]
        for token in re.findall(r"`([A-Z_]+)`", first):
            names.add(token if token.startswith("TASKCENTER_") else "TASKCENTER" + token)
    return names


def test_the_operations_guide_lists_every_setting_and_no_other() -> None:
    assert _documented_settings() == {f"TASKCENTER_{name.upper()}" for name in Settings.model_fields}


def _metrics_table() -> dict[str, str]:
    """Operations.md's metrics table (the one after *Observe*): metric name -> its *moves in* cell."""
    text = (DOCS / "operations.md").read_text().split("## Observe", 1)[1]
    table = text.split("| metric | what | moves in |", 1)[1].split("\n\n", 1)[0]
    rows: dict[str, str] = {}
    for line in table.splitlines():
        cells = line.split("|")
        found = re.findall(r"`(taskcenter_[a-z_]+)(?:\{[a-z]+\})?`", cells[1]) if len(cells) > 3 else []
        if found:
            assert found[0] not in rows, f"{found[0]} is listed twice"
            rows[found[0]] = cells[3]
    return rows


def test_the_operations_guide_lists_every_metric_and_no_other() -> None:
    exported = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in Metrics().registry.collect()
    }
    assert set(_metrics_table()) == exported


def test_the_operations_guide_says_which_processes_move_each_metric() -> None:
    """Each row names only the kinds of process the guide defines below the table (or none, ``–``)."""
    kinds = {"serve", "serve --no-worker", "worker"}
    for name, cell in _metrics_table().items():
        named = set(re.findall(r"`([^`]+)`", cell))
        assert named <= kinds, f"{name}: {named - kinds}"
        assert named or cell.strip().startswith("–"), f"{name} names no process and does not say none"


def test_the_operations_guide_example_config_file_loads(tmp_path: Path) -> None:
    text = (DOCS / "operations.md").read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "taskcenter.toml").write_text(example)
    settings = load_settings(tmp_path / "taskcenter.toml")
    assert settings.concurrency == 200 and settings.default_retry["max_attempts"] == 8
