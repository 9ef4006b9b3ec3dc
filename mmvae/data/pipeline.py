"""Input pipeline: deterministic shuffled batches with background prefetch.

The order of training batches is a pure function of (seed, epoch): epoch e uses the
permutation drawn from ``SeedSequence([seed, e])``. The position (epoch, offset) is
part of the checkpoint, so a resumed run sees exactly the batches an uninterrupted run
would. A daemon thread assembles the next ``prefetch`` batches while the accelerator
works on the current one.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Iterator

import numpy as np

from mmvae.data.dataset import Cohort


@dataclasses.dataclass
class Position:
    epoch: int = 0
    offset: int = 0   # index of the next batch within the epoch


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(n)


def batch_indices(n: int, batch_size: int, seed: int, pos: Position) -> tuple[np.ndarray, Position]:
    """Indices of the batch at ``pos`` and the next position (drop-remainder epochs)."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch size {batch_size} is larger than the training set ({n} cases)")
    perm = epoch_permutation(n, seed, pos.epoch)
    idx = perm[pos.offset * batch_size:(pos.offset + 1) * batch_size]
    nxt = Position(pos.epoch, pos.offset + 1)
    if nxt.offset >= per_epoch:
        nxt = Position(pos.epoch + 1, 0)
    return idx, nxt


def train_batches(cohort: Cohort, batch_size: int, seed: int, start: Position, rows: slice = slice(None),
                  prefetch: int = 2) -> Iterator[tuple[dict, Position]]:
    """Endless ``(batch, position after it)`` from ``start``.

    Only the ``rows`` of each global batch are loaded: in a multi-process run each
    process passes its own slice and feeds its local shard.
    """

    def produce(pos: Position):
        while True:
            idx, pos = batch_indices(len(cohort), batch_size, seed, pos)
            yield cohort.batch(idx[rows]), pos

    return prefetched(produce(start), prefetch)


def eval_batches(cohort: Cohort, batch_size: int, rows: slice = slice(None),
                 prefetch: int = 2) -> Iterator[tuple[dict, np.ndarray]]:
    """Every case once, in order; the last global batch is padded with empty rows.

    Yields ``(the rows of the batch, global valid mask (B,) bool)``.
    """

    def produce():
        for begin in range(0, len(cohort), batch_size):
            idx = np.arange(begin, begin + batch_size)
            valid = idx < len(cohort)
            idx = np.where(valid, idx, 0)
            yield cohort.batch(idx[rows], valid=valid[rows]), valid

    return prefetched(produce(), prefetch)


def prefetched(it: Iterator, size: int) -> Iterator:
    """Run ``it`` in a daemon thread, ``size`` items ahead. ``size <= 0``: no thread."""
    if size <= 0:
        yield from it
        return
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def worker():
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # surface errors in the consumer
            q.put(e)

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
