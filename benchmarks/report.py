"""How the benchmark scripts publish a result: the table on the terminal, the JSON on stdout for
machines, and, with ``out``, OUT.txt (the table as printed) and OUT.json beside each other (docs/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def publish(table: Any, data: Any, out: Path | None, width: int = 140) -> None:
    from rich.console import Console

    console = Console(record=True, width=width)
    console.print(table)
    print(json.dumps(data))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(data, indent=1))
        out.with_suffix(".txt").write_text(console.export_text())
