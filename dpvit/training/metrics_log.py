"""metrics.jsonl: one JSON object per logged step, skipped step and epoch, appended by rank 0.

It is the run's record of truth: the report's curves and `python -m dpvit.evaluate` read it
back, and a checkpoint keeps the epoch records so a resumed run's history is complete.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dpvit.errors import UserError

logger = logging.getLogger(__name__)


class MetricsLog:
    """Appends records to ``path``; on ranks other than 0 (``enabled`` False) it does nothing.

    Args:
        path: the run's metrics.jsonl.
        enabled: True on the one rank that writes files.
    """

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def append(self, record: dict[str, Any]) -> None:
        """Append one record as a line of JSON."""
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as err:  # a full or read-only disk: one line, not a traceback
            raise UserError(f"could not append to {self.path}: {err.strerror or err}") from err

    def read(self) -> list[dict[str, Any]]:
        """Every record written so far (see `read_metrics`)."""
        return read_metrics(self.path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (an empty list when there is none)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s: skipping a line that is not JSON (a run killed mid-write?)", path)
    return records
