"""Metric writers: JSON lines (``metrics.jsonl``) and TensorBoard event files, process 0 only."""
from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np


def _flatten(metrics: dict, names: dict[str, list[str]] | None = None) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        if a.ndim == 0:
            out[k] = float(a)
        else:
            labels = (names or {}).get(k) or [str(i) for i in range(a.size)]
            for lab, x in zip(labels, a.ravel()):
                out[f"{k}/{lab}"] = float(x)
    return out


class MetricWriter:
    def __init__(self, workdir: str | Path, *, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.active:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(str(Path(workdir) / "tb"))

    def write(self, step: int, metrics: dict, *, split: str = "train", names: dict | None = None) -> dict:
        flat = _flatten(metrics, names)
        if self.active:
            row = {"step": int(step), "split": split}
            row.update({k: (v if math.isfinite(v) else str(v)) for k, v in flat.items()})
            self._fh.write(json.dumps(row) + "\n")
            self._fh.flush()
            if self._tb is not None:
                for k, v in flat.items():
                    if math.isfinite(v):
                        self._tb.add_scalar(f"{split}/{k}", v, int(step))
        return flat

    def close(self):
        if self.active:
            self._fh.close()
            if self._tb is not None:
                self._tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    p = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []
