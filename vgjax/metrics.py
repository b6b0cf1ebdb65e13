"""Run metrics: one JSON object per line in <workdir>/metrics.jsonl, and the same numbers (plus
pictures and text) in TensorBoard event files in <workdir>/tensorboard.

The event files are written with tensorboardX's FileWriter and summary protos (no TensorFlow),
imported on first use and without torch: tensorboardX imports torch, when installed, only for
an isinstance check we never need, and that import takes seconds.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np


class MetricWriter:
    """Appends records to <workdir>/metrics.jsonl and writes TensorBoard events next to it, with
    tags exactly as given (tensorboardX's SummaryWriter would rename e.g. "R@1" to "R_1")."""

    def __init__(self, workdir: str | Path, *, enabled: bool = True):
        self.enabled = enabled  # False: writes nothing (a multi-process run's other processes)
        if not enabled:
            return
        tensorboardx = _tensorboardx()
        self._jsonl = Path(workdir) / "metrics.jsonl"
        self._events = tensorboardx.FileWriter(str(Path(workdir) / "tensorboard"))
        self._summary = tensorboardx.summary  # the Summary proto and makers of its values

    def write(self, step: int, record: dict, prefix: str = "") -> None:
        """Appends {"step": step, **record}; numeric leaves (nested dicts flattened with "/")
        also become TensorBoard scalars named prefix + key."""
        if not self.enabled:
            return
        with open(self._jsonl, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        scalar = self._summary.Summary.Value
        self._add(step, [scalar(tag=tag, simple_value=value) for tag, value in _scalars(record, prefix)])

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """TensorBoard images (PNG): tag -> uint8 [H, W, 3] array."""
        if not self.enabled:
            return
        value, make_image = self._summary.Summary.Value, self._summary.make_image
        self._add(step, [value(tag=tag, image=make_image(np.asarray(image, np.uint8)))
                         for tag, image in images.items()])

    def write_text(self, step: int, texts: Mapping[str, str]) -> None:
        """TensorBoard text (markdown): tag -> text, shown under "<tag>/text_summary"."""
        if not self.enabled:
            return
        self._add(step, [value for tag, text in texts.items()
                         for value in self._summary.text(tag, text).value])

    def close(self) -> None:
        if self.enabled:
            self._events.close()

    def _add(self, step: int, values: list) -> None:
        """Writes one event with `values` (if any) and flushes it to disk."""
        if values:
            self._events.add_summary(self._summary.Summary(value=values), step)
            self._events.flush()


def _scalars(record: dict, prefix: str) -> Iterator[tuple[str, float]]:
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)


def _tensorboardx():
    """The tensorboardX package, imported without torch unless torch is already loaded."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        return importlib.import_module("tensorboardX")
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX allows
    try:
        return importlib.import_module("tensorboardX")
    finally:
        del sys.modules["torch"]
