"""From a manifest to training-ready arrays: load → preprocess (cached) → tokenise.

:func:`prepare_cohort` turns every case of a manifest into memory-mapped preprocessed
arrays (see :mod:`mmvae.data.cache`), tokenised reports and encoded clinical fields,
and :meth:`Cohort.batch` assembles static-shape batches with presence masks:

* ``image/<m>``: ``(B, S, *shape)`` float32, zeros where absent; ``series_mask/<m>``:
  ``(B, S)`` (S = ``data.max_series``; extra series beyond S are dropped, in manifest order)
* ``report/ids``, ``report/mask``: ``(B, T)`` int32 (T = ``data.text.max_len``)
* ``clinical/num``, ``clinical/num_mask`` ``(B, Fn)``; ``clinical/cat``, ``clinical/cat_mask`` ``(B, Fc)``
* ``label/id``, ``label/mask`` ``(B,)``: only for a cohort given label supervision
  (:func:`with_label_supervision`, the semi-supervised label expert)
* entries of modalities of other kinds, built per case by their kind's ``case_arrays``
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from mmvae.atomic import atomic_write_text
from mmvae.data import io as mio
from mmvae.data.cache import PreprocessCache, source_hash
from mmvae.data.checks import _describe
from mmvae.data.manifest import REPORT, CaseEntries, group_cases, read_manifest
from mmvae.data.preprocess import PreprocessConfig, preprocess_series
from mmvae.data.text import token_lengths, tokenize
from mmvae.errors import InputError
from mmvae.progress import progress_bar

log = logging.getLogger(__name__)
CLINICAL = "clinical"


def preprocess_config(data_cfg) -> PreprocessConfig:
    """``data.*`` → :class:`PreprocessConfig`. ``data.crop='auto'``: ``fit`` (the whole image,
    resized to ``data.shape``) when ``data.spacing`` is empty (native spacing: key images
    without a physical pixel size), else ``foreground``."""
    spacing = tuple(float(s) for s in data_cfg.spacing) if data_cfg.spacing else None
    crop = data_cfg.crop if data_cfg.crop != "auto" else ("fit" if spacing is None else "foreground")
    return PreprocessConfig(spacing=spacing, shape=tuple(int(s) for s in data_cfg.shape),
                            crop=crop, clip_percentiles=tuple(data_cfg.clip_percentiles),
                            normalize=data_cfg.normalize)


@dataclasses.dataclass
class Cohort:
    """Preprocessed cases, indexable by position.

    ``images``: per image modality, per case, ``(V, *shape)`` (memmap) or None; ``arrays``:
    every other batch entry, one fixed-shape row per case (``report/ids`` ``(N, T)``,
    ``clinical/num`` ``(N, Fn)``, ``label/id`` ``(N,)``, entries of other modality kinds...).
    A modality ``m`` of ``arrays`` is present in case i where one of its ``m/...mask``
    entries is non-zero in row i.
    """

    case_ids: list[str]
    image_modalities: tuple[str, ...]
    images: dict[str, list[np.ndarray | None]]      # per modality, per case: (V, *shape) memmap or None
    reports: list[str | None]
    arrays: dict[str, np.ndarray]                     # batch key -> (N, ...) per-case entries
    labels: list[dict[str, str]]
    shape: tuple[int, ...]
    max_series: int
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    clinical_stats: dict = dataclasses.field(default_factory=dict)
    # every choice the loader made and everything dropped short of a whole case:
    # {"case_id", "modality", "kind": choice | dropped | truncated, "message", "path"}
    notes: list[dict] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.case_ids)

    # named views of the built-in entries
    tokens = property(lambda self: self.arrays["report/ids"])                 # (N, T) int32
    token_mask = property(lambda self: self.arrays["report/mask"])            # (N, T) int32
    clinical_num = property(lambda self: self.arrays["clinical/num"])         # (N, Fn) float32
    clinical_num_mask = property(lambda self: self.arrays["clinical/num_mask"])
    clinical_cat = property(lambda self: self.arrays["clinical/cat"])         # (N, Fc) int32
    clinical_cat_mask = property(lambda self: self.arrays["clinical/cat_mask"])
    label_id = property(lambda self: self.arrays.get("label/id"))             # (N,) int32 or None
    label_mask = property(lambda self: self.arrays.get("label/mask"))         # (N,) float32 or None

    def present_modalities(self, i: int) -> list[str]:
        """Observed modalities of case ``i`` (the label expert's entries are not a modality)."""
        out = [m for m in self.image_modalities if self.images[m][i] is not None]
        for key, a in self.arrays.items():
            m = key.split("/")[0]
            if m != "label" and key.endswith("mask") and m not in out and np.any(a[i]):
                out.append(m)
        return out

    def label_array(self, name: str) -> np.ndarray:
        """Labels of every case as strings ('' where missing)."""
        return np.asarray([lab.get(name, "") for lab in self.labels], dtype=object)

    def batch(self, indices: Sequence[int], *, valid: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
        """Static-shape batch of the cases at ``indices`` (rows with ``valid`` False are empty)."""
        idx = np.asarray(indices, dtype=np.int64)
        b, s = len(idx), self.max_series
        valid = np.ones(b, bool) if valid is None else np.asarray(valid, bool)
        out: dict[str, np.ndarray] = {}
        for m in self.image_modalities:
            x = np.zeros((b, s) + self.shape, np.float32)
            mask = np.zeros((b, s), np.float32)
            for r, i in enumerate(idx):
                arr = self.images[m][i] if valid[r] else None
                if arr is not None:
                    n = min(s, arr.shape[0])
                    x[r, :n] = arr[:n]
                    mask[r, :n] = 1.0
            out[f"image/{m}"], out[f"series_mask/{m}"] = x, mask
        for key, a in self.arrays.items():
            v = valid.reshape((b,) + (1,) * (a.ndim - 1))
            out[key] = np.where(v, a[idx], 0).astype(a.dtype)
        return out

    def subset(self, indices: Sequence[int]) -> "Cohort":
        idx = list(indices)
        keep = {self.case_ids[i] for i in idx}
        return dataclasses.replace(
            self, case_ids=[self.case_ids[i] for i in idx],
            images={m: [v[i] for i in idx] for m, v in self.images.items()},
            reports=[self.reports[i] for i in idx], arrays={k: a[idx] for k, a in self.arrays.items()},
            labels=[self.labels[i] for i in idx], skipped=[],
            notes=[n for n in self.notes if n["case_id"] in keep])


def fixed_arrays(tokens: np.ndarray, token_mask: np.ndarray, num: np.ndarray, num_mask: np.ndarray,
                 cat: np.ndarray, cat_mask: np.ndarray, other: dict[str, np.ndarray] | None = None
                 ) -> dict[str, np.ndarray]:
    """The per-case batch entries of reports and clinical fields (+ ``other`` kinds' entries), typed."""
    out = {"report/ids": tokens.astype(np.int32), "report/mask": token_mask.astype(np.int32),
           "clinical/num": num.astype(np.float32), "clinical/num_mask": num_mask.astype(np.float32),
           "clinical/cat": cat.astype(np.int32), "clinical/cat_mask": cat_mask.astype(np.float32)}
    out.update(other or {})
    return out


def case_arrays(cases: Sequence[CaseEntries], builders: Mapping[str, Callable[[CaseEntries], dict]]
                ) -> dict[str, np.ndarray]:
    """Stack the entries ``builders[m](case) -> {key: per-case array}`` of every case (``(N, ...)``).

    A builder must return the same keys and shapes for every case, zeros and a zero mask
    for a case without the modality. Errors name the case and modality (:class:`InputError`)."""
    rows = []
    for c in cases:
        row = {}
        for m, build in builders.items():
            try:
                row[m] = build(c)
            except InputError as e:
                raise e.with_context(case_id=c.case_id, modality=m) from None
        rows.append(row)
    return stack_entries(cases, rows)


def stack_entries(cases: Sequence[CaseEntries], rows: Sequence[Mapping[str, dict]]) -> dict[str, np.ndarray]:
    """``rows[i][m] = {key: array}`` of case i → ``{key: (N, ...)}``; a shape that differs from the
    first case's is an InputError naming the case and modality."""
    out: dict[str, list] = {}
    first: dict[str, tuple] = {}
    for c, row in zip(cases, rows):
        for m, entries in row.items():
            for key, a in entries.items():
                a = np.asarray(a)
                if first.setdefault(key, a.shape) != a.shape:
                    raise InputError(f"batch entry {key!r} has shape {a.shape}, other cases {first[key]}",
                                     case_id=c.case_id, modality=m)
                out.setdefault(key, []).append(a)
    return {k: np.stack(v) for k, v in out.items()}


def with_label_supervision(cohort: Cohort, label: str, classes: Sequence[str], fraction: float,
                           seed: int) -> Cohort:
    """The cohort with ``label`` given to the label expert on a fraction of its labelled cases.

    Of the ``n`` cases whose ``label`` is one of ``classes``, ``round(fraction · n)`` are
    chosen by a permutation seeded with ``seed`` (the same cases for the same cohort,
    fraction and seed; a larger fraction keeps the cases of a smaller one). Returns a
    copy with ``label_id (N,)`` (index into ``classes``) and ``label_mask (N,)``.
    """
    values = cohort.label_array(label)
    index = {c: i for i, c in enumerate(classes)}
    have = np.asarray([v in index for v in values])
    ids = np.asarray([index.get(v, 0) for v in values], np.int32)
    cand = np.nonzero(have)[0]
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 104729])).permutation(len(cand))
    chosen = cand[order[: int(round(float(fraction) * len(cand)))]]
    mask = np.zeros(len(values), np.float32)
    mask[chosen] = 1.0
    return dataclasses.replace(cohort, arrays={**cohort.arrays, "label/id": ids, "label/mask": mask})


def read_case_list(path: str | os.PathLike) -> list[str]:
    """Case ids of a file: a CSV with a ``case_id`` column, or one id per line (``#`` comments)."""
    p = Path(path)
    from mmvae.data.text import decode_text
    try:
        text = decode_text(p.read_bytes())
    except OSError as e:
        raise InputError(f"cannot read the case list ({e.strerror})", path=str(p)) from None
    except InputError as e:
        raise InputError(f"case list {e.reason}", path=str(p)) from None
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.lstrip().startswith("#")]
    if lines and "case_id" in [c.strip() for c in lines[0].split(",")]:
        col = [c.strip() for c in lines[0].split(",")].index("case_id")
        return [x.split(",")[col].strip() for x in lines[1:] if x.split(",")[col].strip()]
    return lines


def with_listed_labels(cohort: Cohort, label: str, classes: Sequence[str], case_ids: Sequence[str]) -> Cohort:
    """The cohort with ``label`` given to the label expert on exactly the listed cases (those of
    them in this cohort whose label is one of ``classes``; listed ids of other cases, e.g. of
    the validation split, are ignored). Same arrays as :func:`with_label_supervision`."""
    values = cohort.label_array(label)
    index = {c: i for i, c in enumerate(classes)}
    listed = set(case_ids)
    ids = np.asarray([index.get(v, 0) for v in values], np.int32)
    mask = np.asarray([cid in listed and v in index for cid, v in zip(cohort.case_ids, values)], np.float32)
    return dataclasses.replace(cohort, arrays={**cohort.arrays, "label/id": ids, "label/mask": mask})


def _load_and_preprocess(path: str, cfg: PreprocessConfig, spatial_dims: int,
                         reference: str | None, b_value: str | float = "highest",
                         max_voxels: int | None = None) -> tuple[np.ndarray, list[str]]:
    """``((V, *shape) float32, notes)``: the chosen volumes of ``path`` preprocessed, and the
    loader's choices in words. An output that is constant (e.g. nothing left after cropping)
    is an InputError naming ``path``, not an all-zero input. ``max_voxels``: the loaders'
    size limit (``data.max_voxels``; None: :data:`mmvae.data.io.MAX_VOXELS`)."""
    ref = None
    if reference is not None:
        ref = mio.load_image(reference, spatial_dims=spatial_dims, b_value=b_value, max_voxels=max_voxels).series[0]
    loaded = mio.load_image(path, spatial_dims=spatial_dims, b_value=b_value, max_voxels=max_voxels)
    out = np.stack([preprocess_series(v, cfg, reference=ref) for v in loaded.series]).astype(np.float32)
    for v in out:
        if not np.any(v != v.flat[0]):
            raise InputError(f"image is constant after preprocessing (every voxel {float(v.flat[0]):g}; "
                             f"shape {cfg.shape}, crop {cfg.crop!r}): nothing of it would reach the model", path=path)
    return out, loaded.notes


def load_case_images(case: CaseEntries, modality: str, paths: Sequence[str], cache: PreprocessCache,
                     cfg: PreprocessConfig, spatial_dims: int, reference: str | None, *,
                     b_value: str | float = "highest", notes: list | None = None,
                     max_voxels: int | None = None) -> np.ndarray:
    """All volumes of one modality of one case, preprocessed: ``(V, *shape)`` (memmap when single).

    ``notes``: when given, receives the loader's choices as ``(path, note)``. ``max_voxels``:
    a file larger than this is refused from its headers (``data.max_voxels``; None: the
    loaders' :data:`~mmvae.data.io.MAX_VOXELS`); an array already in ``cache`` is not read
    again, so the limit is not its cache key."""
    arrays = []
    for p in paths:
        try:
            if not Path(p).exists():
                raise InputError("file not found", path=p)
            ref_part = source_hash(reference) if reference and reference != p else ""
            key = cache.key(source_hash(p), repr(cfg.key()), str(spatial_dims), ref_part, f"b={b_value}")
            use_ref = reference if reference and reference != p else None
            arr, said = cache.get_or_build_noted(
                key, lambda: _load_and_preprocess(p, cfg, spatial_dims, use_ref, b_value, max_voxels))
            arrays.append(arr)
            if notes is not None:
                notes.extend((p, x) for x in said)
        except InputError as e:
            raise e.with_context(case_id=case.case_id, modality=modality, path=p) from None
        except (ValueError, RuntimeError, MemoryError) as e:   # numeric failure deep in preprocessing
            raise InputError(f"preprocessing failed: {_describe(e, full=True)}", case_id=case.case_id, modality=modality,
                             path=p) from None
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, 0)


def clinical_arrays(cases: Sequence[CaseEntries], numeric: Sequence[str], categorical: dict):
    n = len(cases)
    num = np.zeros((n, len(numeric)), np.float32)
    num_mask = np.zeros((n, len(numeric)), np.float32)
    cat_names = list(categorical)
    cat = np.zeros((n, len(cat_names)), np.int32)
    cat_mask = np.zeros((n, len(cat_names)), np.float32)
    for i, c in enumerate(cases):
        for f, name in enumerate(numeric):
            v = c.metadata.get(name)
            if isinstance(v, (int, float)) and math.isfinite(v):
                num[i, f], num_mask[i, f] = float(v), 1.0
        for f, name in enumerate(cat_names):
            v = c.metadata.get(name)
            if v is not None and str(v) in list(categorical[name]):
                cat[i, f], cat_mask[i, f] = list(categorical[name]).index(str(v)), 1.0
    return num, num_mask, cat, cat_mask


def standardize_clinical(num: np.ndarray, mask: np.ndarray, stats: dict | None = None):
    """z-score numeric fields with (mean, std) computed over present values (or given)."""
    if stats is None:
        cnt = np.maximum(mask.sum(0), 1)
        mean = (num * mask).sum(0) / cnt
        std = np.sqrt((((num - mean) * mask) ** 2).sum(0) / cnt)
        stats = {"mean": mean.tolist(), "std": np.where(std > 0, std, 1.0).tolist()}
    out = (num - np.asarray(stats["mean"], np.float32)) / np.asarray(stats["std"], np.float32) * mask
    return out.astype(np.float32), stats


def prepare_cohort(manifest: str | Path, data_cfg, cache: PreprocessCache, tokenizer=None, *,
                   clinical_stats: dict | None = None, show_progress: bool = True,
                   builders: Mapping[str, Callable[[CaseEntries], dict]] | None = None) -> Cohort:
    """Load, validate and preprocess every case of ``manifest``.

    ``builders``: for modalities of other kinds (``data.other_modalities``), ``m ->
    builder(case) -> {batch key: per-case array}`` (see :func:`case_arrays`).

    With ``data_cfg.on_error == 'skip'`` a case with an unusable file is skipped with a
    warning and recorded in ``Cohort.skipped``; otherwise its :class:`InputError` is raised.
    """
    modalities = list(data_cfg.image_modalities)
    known = modalities + [REPORT]   # report rows are read (and ignored) even when data.report is off
    entries = read_manifest(manifest)
    ignored_notes: list[dict] = []
    if data_cfg.extra_modalities == "ignore":   # e.g. ablations that train on fewer sequences
        for e in entries:
            if e.modality and e.modality not in known:
                ignored_notes.append({"case_id": e.case_id, "modality": e.modality, "kind": "choice", "path": e.path,
                                      "message": f"modality {e.modality!r} is not in data.image_modalities "
                                                 f"{modalities}: ignored (data.extra_modalities='ignore')"})
        entries = [e if (not e.modality or e.modality in known) else dataclasses.replace(e, modality="", path=None)
                   for e in entries]   # keep the row's labels and metadata
    cases = group_cases(entries, known)
    cfg = preprocess_config(data_cfg)
    spatial_dims = int(data_cfg.spatial_dims)
    if len(cfg.shape) != spatial_dims:
        raise InputError(f"data.shape {cfg.shape} does not have data.spatial_dims={spatial_dims} axes")
    ref_mod = data_cfg.reference_modality or None
    on_error = data_cfg.on_error

    b_value = data_cfg.dwi_b_value
    max_voxels = int(data_cfg.max_voxels)
    max_series = int(data_cfg.max_series)

    def work(case: CaseEntries):
        """``(images, report, notes, error)``; with ``on_error='skip'`` a bad modality is dropped
        (noted) and the case kept while anything usable remains."""
        notes: list[dict] = []

        def note(kind, modality, message, path=None):
            notes.append({"case_id": case.case_id, "modality": modality, "kind": kind, "message": message,
                          "path": path})

        def dropped(e: InputError, modality):
            if on_error != "skip":
                raise e
            note("dropped", modality, str(e), getattr(e, "path", None))

        try:
            ref = case.images.get(ref_mod, [None])[0] if ref_mod else None
            imgs = {}
            for m in modalities:
                if not case.images.get(m):
                    continue
                said: list = []
                try:
                    imgs[m] = load_case_images(case, m, case.images[m], cache, cfg, spatial_dims, ref,
                                               b_value=b_value, notes=said, max_voxels=max_voxels)
                except InputError as e:
                    dropped(e, m)
                    continue
                for path, x in said:
                    note("choice", m, x, path)
                if imgs[m].shape[0] > max_series:
                    note("truncated", m, f"{imgs[m].shape[0]} series, the model takes the first {max_series} "
                                         f"(data.max_series): dropped {imgs[m].shape[0] - max_series}")
            others = {}
            for m, build in (builders or {}).items():
                try:
                    others[m] = build(case)
                except InputError as e:
                    dropped(e.with_context(case_id=case.case_id, modality=m), m)
                    # the kind's entries for a case without the modality (case_arrays' contract)
                    others[m] = build(dataclasses.replace(case, metadata={k: v for k, v in case.metadata.items()
                                                                          if k != m}))
            report = None
            try:
                report = case.read_report() if data_cfg.report else None
                if data_cfg.report and report is not None and not report.strip():
                    raise InputError("empty report", case_id=case.case_id, modality=REPORT,
                                     path=case.report_path)
            except InputError as e:
                report = None
                if e.reason == "empty report" and data_cfg.empty_report == "drop":
                    # A blank report is a missing report, not a broken file: one blank export in a
                    # cohort of hundreds does not stop training (data.empty_report; queries stay strict).
                    note("dropped", REPORT, str(e) + " (data.empty_report=drop: the case is kept without "
                                                     "its report)", getattr(e, "path", None))
                else:
                    dropped(e, REPORT)
            if not imgs and report is None and not case.metadata:
                why = "; ".join(n["message"] for n in notes if n["kind"] == "dropped")
                raise InputError("case has no usable modality" + (f" ({why})" if why else ""), case_id=case.case_id)
            return (imgs, others), report, notes, None
        except InputError as e:
            if on_error != "skip":
                raise
            return None, None, notes, e

    kept, images, reports, skipped, notes, other_rows = [], {m: [] for m in modalities}, [], [], list(ignored_notes), []
    workers = max(1, int(data_cfg.workers))
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(work, cases)
        for case, (imgs, report, case_notes, err) in progress_bar(zip(cases, results), total=len(cases),
                                                                  desc="preprocess", enable=show_progress):
            notes.extend(case_notes)
            if err is not None:
                log.warning("skipping %s", err)
                skipped.append((case.case_id, str(err)))
                continue
            imgs, others = imgs
            kept.append(case)
            for m in modalities:
                images[m].append(imgs.get(m))
            reports.append(report)
            other_rows.append(others)
    if skipped:
        log.warning("skipped %d of %d cases because of bad input", len(skipped), len(cases))
    text_cfg = data_cfg.text
    if tokenizer is not None and data_cfg.report:
        tokens, token_mask = tokenize(tokenizer, reports, int(text_cfg.max_len))
        lengths = token_lengths(tokenizer, reports)
        for c, n in zip(kept, lengths):
            if n > int(text_cfg.max_len):
                notes.append({"case_id": c.case_id, "modality": REPORT, "kind": "truncated", "path": c.report_path,
                              "message": f"report of {n} tokens truncated to data.text.max_len={text_cfg.max_len}"})
    else:
        tokens = np.zeros((len(kept), int(text_cfg.max_len)), np.int32)
        token_mask = np.zeros_like(tokens)
    num, num_mask, cat, cat_mask = clinical_arrays(kept, list(data_cfg.clinical.numeric),
                                                    dict(data_cfg.clinical.categorical))
    num, clinical_stats = standardize_clinical(num, num_mask, clinical_stats)
    arrays = fixed_arrays(tokens, token_mask, num, num_mask, cat, cat_mask, stack_entries(kept, other_rows))
    log_notes(notes)
    return Cohort(case_ids=[c.case_id for c in kept], image_modalities=tuple(modalities), images=images,
                  reports=reports, arrays=arrays, labels=[dict(c.labels) for c in kept], shape=cfg.shape,
                  max_series=int(data_cfg.max_series), skipped=skipped, clinical_stats=clinical_stats, notes=notes)


def input_summary(cohort: Cohort) -> dict:
    """What the loader did to a cohort: counts, skipped cases and every note (JSON-ready)."""
    kinds = sorted({n["kind"] for n in cohort.notes})
    return {"cases": len(cohort), "skipped_cases": [{"case_id": c, "reason": r} for c, r in cohort.skipped],
            "counts": {k: sum(n["kind"] == k for n in cohort.notes) for k in kinds}, "notes": list(cohort.notes)}


def write_input_summary(path: str | Path, cohort: Cohort) -> Path:
    """Write :func:`input_summary` as JSON (atomically): the run's record of every choice and drop."""
    return atomic_write_text(path, json.dumps(input_summary(cohort), indent=1))


def log_notes(notes: Sequence[dict]) -> None:
    """One log line per kind of note (choices, dropped modalities, truncations) with counts and an example."""
    by_kind: dict[str, list[dict]] = {}
    for n in notes:
        by_kind.setdefault(n["kind"], []).append(n)
    for kind, items in by_kind.items():
        ex = items[0]
        log.warning("%s: %d case-modalities (e.g. case %r, %s: %s)", {"choice": "loader choices", "dropped":
                    "dropped modalities", "truncated": "truncated (reports, series)"}.get(kind, kind), len(items),
                    ex["case_id"], ex["modality"], ex["message"])


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation split of ``range(n)``."""
    perm = np.random.default_rng(np.random.SeedSequence([seed, 7919])).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
