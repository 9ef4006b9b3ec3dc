"""Metric writers: JSON lines (``metrics.jsonl``) and TensorBoard event files, process 0 only.

``metrics.jsonl`` holds one object per logged step and split::

    {"step": 20, "split": "train", "loss": ..., "elbo_per_term/joint": ..., "lr": ...}
    {"step": 500, "split": "val", "loss": ..., "retrieval/map@10/all": ...}

Non-finite values are written as strings (``"nan"``, ``"inf"``) so every line is
valid JSON. On resume from step S, rows after S (logged by the interrupted run after
its last checkpoint) are dropped first and TensorBoard is told to purge events after
S, so the files read as if the run had never stopped.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np

from mmvae.atomic import atomic_write_text


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


def truncate_metrics(workdir: str | Path, last_step: int) -> int:
    """Drop rows of ``metrics.jsonl`` with step > ``last_step``; return how many were dropped."""
    p = Path(workdir) / "metrics.jsonl"
    if not p.exists():
        return 0
    keep, dropped = [], 0
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:   # a line cut short by a crash
            dropped += 1
            continue
        if int(row.get("step", 0)) > last_step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        atomic_write_text(p, "".join(x + "\n" for x in keep))
    return dropped


class MetricWriter:
    """Append metric rows; only process 0 writes. ``resume_step``: see the module doc."""

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True, resume_step: int | None = None):
        self.active = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.active:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                truncate_metrics(workdir, resume_step)
            self._fh = open(self.path, "a", encoding="utf-8")
            if tensorboard:
                from tensorboardX import SummaryWriter
                purge = resume_step + 1 if resume_step is not None and (Path(workdir) / "tb").exists() else None
                self._tb = SummaryWriter(str(Path(workdir) / "tb"), purge_step=purge)

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
                self._tb.flush()
        return flat

    def close(self):
        if self.active:
            self._fh.close()
            if self._tb is not None:
                self._tb.close()


def read_metrics(workdir: str | Path, split: str | None = None) -> list[dict]:
    """Rows of ``metrics.jsonl`` (of one ``split`` if given)."""
    p = Path(workdir) / "metrics.jsonl"
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []
    return [r for r in rows if split is None or r.get("split") == split]
