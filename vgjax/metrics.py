"""Run metrics: one JSON object per line in <workdir>/metrics.jsonl, and the same numbers as
TensorBoard scalars in <workdir>/tensorboard (tensorboardX: event files without TensorFlow)."""

from __future__ import annotations

import json
from pathlib import Path

from tensorboardX import SummaryWriter


class MetricWriter:
    def __init__(self, workdir: Path):
        self._jsonl = Path(workdir) / "metrics.jsonl"
        self._tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, record: dict, prefix: str = "") -> None:
        """Appends {"step": step, **record}; numeric leaves (nested dicts flattened with "/")
        also become TensorBoard scalars named prefix + key."""
        with open(self._jsonl, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        for tag, value in _scalars(record, prefix):
            self._tensorboard.add_scalar(tag, value, step)
        self._tensorboard.flush()

    def close(self) -> None:
        self._tensorboard.close()


def _scalars(record: dict, prefix: str):
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)
