"""Query-by-example case retrieval: files of a new case in, similar indexed cases out.

:class:`Retriever` ties a trained work dir (model, tokenizer, clinical statistics,
preprocessing configuration) to a case index (:mod:`mmvae.retrieval.index`)::

    r = Retriever.load("runs/quickstart", "runs/quickstart/index")
    hits = r.search({"t2": ["a_t2.nii.gz"], "dwi": ["dicom/dwi_series/"]},
                    report="Ring-enhancing lesion ...", k=10, filter={"has": "dwi"})
    hits = r.search(..., feedback={"relevant": ["c0012"], "nonrelevant": ["c0007"]})

A query goes through exactly what a cohort case goes through in
:func:`mmvae.data.dataset.prepare_cohort`: every file (NIfTI file, DICOM series
folder, PNG) is loaded, validated and preprocessed by
:func:`mmvae.data.dataset.load_case_images` with the run's
:func:`~mmvae.data.dataset.preprocess_config` and ``data.reference_modality``; several
series of one modality fill the padded set dimension (up to ``data.max_series``, extra
ones dropped in the order given); the report is tokenised with the run's tokenizer;
clinical fields are encoded and standardised with the run's ``clinical_stats.json``. The
one-case batch is built by :meth:`mmvae.data.dataset.Cohort.batch` and encoded by the
jitted :func:`mmvae.retrieval.embed.make_encode_fn` (compiled once per
:class:`Retriever`); the experts are fused over the given modalities with the model's
fusion (:func:`mmvae.retrieval.embed.fused`, as for the indexed cases).

Relevance feedback moves the query mean by Rocchio
(:func:`mmvae.retrieval.feedback.rocchio`, weights ``retrieval.rocchio`` of the run's
config) towards the stored means of the cases marked relevant and away from those
marked non-relevant, then searches again.

Nothing here writes to the index folder unless :meth:`Retriever.save` is called.
The ``mmvae query`` command (:func:`mmvae.cli.query.query_main`) exposes the same options.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from mmvae.data.cache import PreprocessCache
from mmvae.models.features import FeatureConfig, FeatureExtractor, case_features, needs_features
from mmvae.data.dataset import (CLINICAL, case_arrays, clinical_arrays, Cohort, fixed_arrays, load_case_images,
                                preprocess_config, standardize_clinical)
from mmvae.data.manifest import CaseEntries, REPORT
from mmvae.data.text import check_report_text, token_lengths, tokenize
from mmvae.errors import ConfigError, InputError
from mmvae.retrieval.embed import (case_vectors, check_embedding, embedding_kind, embedding_width, make_encode_fn,
                                   make_frozen_fn, query_dims, stack_frozen, vector_blocks)
from mmvae.retrieval.feedback import rocchio
from mmvae.retrieval.index import CaseIndex, load_index, RERANKS, Result
from mmvae.retrieval.uncertainty import expert_disagreement, posterior_spread
from mmvae.runs.files import fingerprint, read_run_files
from mmvae.runs.trained import case_builders, load_trained, weights_digest

__all__ = ["Retriever", "Result", "model_identity", "check_weights", "parse_filter", "parse_feedback"]

log = logging.getLogger(__name__)

QUERY_CASE = "query"
FEEDBACK_KEYS = ("relevant", "nonrelevant")


def model_identity(spec, embedding: str = "fused", blocks=None) -> dict:
    """The identity an index of ``embedding`` vectors (:mod:`mmvae.retrieval.embed`) must have been
    built with to be searched with ``spec``'s model; ``blocks``: the index's vector layout
    (``identity['blocks']``, the ``features`` kinds), whose frozen widths the model cannot know."""
    mods = list(spec.query_modalities)
    widths = [0] * len(mods)
    if "features" in embedding:
        expert = {m: w for m, w in (blocks or [])[:len(mods)]} if "experts" in embedding else {}
        frozen = [(m, w) for m, w in (blocks or [])][len(expert):]
        for m, w in frozen:
            if m in mods:
                widths[mods.index(m)] = int(w)
    return {"model_fingerprint": fingerprint(spec),
            "latent_dim": embedding_width(embedding, spec.embedding_dim, len(mods), spec.private_dim, widths)}


_UNCHECKED: set[str] = set()      # indexes already warned about (no weights digest), once per process


def check_weights(identity: Mapping, digest: str, step: int | None, *, workdir, index_dir) -> None:
    """Refuse an index whose vectors other weights computed (stale state).

    ``identity``: the index's (:attr:`CaseIndex.identity`); ``digest``/``step``: the loaded
    run's :func:`~mmvae.runs.trained.weights_digest` and checkpoint step. A different
    ``weights_digest`` raises :class:`InputError` saying how to re-embed; an index without
    one (built before it was recorded) is accepted with one warning per index folder and
    process, since its staleness cannot be checked."""
    have = identity.get("weights_digest")
    if not have:
        key = str(Path(index_dir).resolve())
        if key not in _UNCHECKED:
            _UNCHECKED.add(key)
            log.warning("index %s records no weights digest (built by an older mmvae): whether it is stale "
                        "against the weights of run %s cannot be checked; re-run `mmvae embed` and `mmvae index` "
                        "to record it", index_dir, workdir)
        return
    if have == digest:
        return
    built = identity.get("checkpoint_step")
    raise InputError(
        f"index {index_dir} was built from weights {str(have)[:12]}"
        + (f" (step {built})" if built is not None else "")
        + f" but run {workdir} has {digest[:12]}" + (f" (step {step})" if step is not None else "")
        + f": its vectors are stale; re-run `mmvae embed --workdir {workdir} --manifest MANIFEST --out EMB.npz "
          f"&& mmvae index --embeddings EMB.npz --out {index_dir}`")


def _strip_case(e: InputError) -> InputError:
    """The query is not a cohort case: keep modality and file, drop the case id."""
    return InputError(e.reason, modality=e.modality, path=e.path)


class Retriever:
    """A trained model + its preprocessing + a case index, ready for queries.

    Build it with :meth:`load`. Not thread-safe (the index is not).

    Attributes:
      config, spec, model, tokenizer, clinical_stats: of the trained work dir.
      index: the :class:`~mmvae.retrieval.index.CaseIndex` searched.
      index_dir: where the index was loaded from (the default of :meth:`save`).
    """

    def __init__(self, *, config, spec, model, tokenizer, clinical_stats: dict, index: CaseIndex,
                 workdir: str | os.PathLike | None = None, index_dir: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None):
        self.config = config
        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer
        self.last_notes: list[str] = []   # what the last query's loader chose or dropped, in words
        # Posterior spread and expert disagreement of the last encoded query (mmvae.retrieval.uncertainty).
        self.last_uncertainty: dict = {}
        self.clinical_stats = clinical_stats
        self.index = index
        # Standardisation of a Retriever without an index yet (mmvae.pacs builds one): the
        # cohort statistics its first cases are mapped by (None: raw posterior means).
        self.standardize: dict | None = None
        # The kind of retrieval vector (mmvae.retrieval.embed): the index's, else the config's.
        self.embedding = check_embedding(index.identity.get("embedding", "fused")) if index is not None \
            else embedding_kind(config)
        self.workdir = None if workdir is None else Path(workdir)
        self.index_dir = None if index_dir is None else Path(index_dir)
        self.preprocess = preprocess_config(config.data)
        if self.spec.image_modalities and tuple(self.preprocess.shape) != tuple(self.spec.shape):
            raise ConfigError(f"data.shape {self.preprocess.shape} differs from the model's input shape "
                              f"{tuple(self.spec.shape)}")
        if tuple(config.data.image_modalities) != tuple(spec.image_modalities):
            raise ConfigError(f"data.image_modalities {list(config.data.image_modalities)} differ from the "
                              f"model's {list(spec.image_modalities)}")
        self._tmp = None
        if cache_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mmvae-query-cache-")
            cache_dir = self._tmp.name
        self.cache = PreprocessCache(cache_dir)
        self._encode = make_encode_fn(model)   # jitted once; one-case batches keep one shape
        self._frozen = make_frozen_fn(model)
        self.last_blocks: list | None = None   # layout of the last query's features-kind vector
        self.blocks: list | None = None        # the standardisation source's layout (PACS, before an index)
        self._weights_digest: str | None = None   # of the model's parameters (weights_digest)

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, workdir: str | os.PathLike, index_dir: str | os.PathLike, *,
             cache_dir: str | os.PathLike | None = None, use_ema: bool = True) -> "Retriever":
        """Load the trained model of ``workdir`` and the index in ``index_dir``.

        The index must have been built from this model's embeddings: its identity must
        hold this model's ``model_fingerprint`` and ``latent_dim``, else
        :class:`~mmvae.errors.IndexError_`, and the exact weights loaded here (its
        ``weights_digest``), else :class:`~mmvae.errors.InputError` (:func:`check_weights`).
        ``cache_dir``: preprocessed-array cache for query files (default: a temporary
        folder removed with the Retriever).
        """
        workdir = Path(workdir)
        _, spec, _ = read_run_files(workdir)                     # cheap: fail before loading weights
        index = load_index(index_dir)
        try:
            kind = check_embedding(index.identity.get("embedding", "fused"))
        except ConfigError as e:
            raise InputError(f"index: {e}", path=str(index_dir)) from None
        index.check_identity(model_identity(spec, kind, index.identity.get("blocks")))
        config, spec, model, tokenizer, step = load_trained(workdir, use_ema=use_ema, return_step=True)
        digest = weights_digest(model)
        check_weights(index.identity, digest, step, workdir=workdir, index_dir=index_dir)
        stats = json.loads((workdir / "clinical_stats.json").read_text())
        r = cls(config=config, spec=spec, model=model, tokenizer=tokenizer, clinical_stats=stats,
                index=index, workdir=workdir, index_dir=index_dir, cache_dir=cache_dir)
        r._weights_digest = digest
        return r

    @property
    def weights_digest(self) -> str:
        """:func:`~mmvae.runs.trained.weights_digest` of the model: record it as
        ``identity['weights_digest']`` in an index built from this Retriever's vectors."""
        if self._weights_digest is None:
            self._weights_digest = weights_digest(self.model)
        return self._weights_digest

    def close(self) -> None:
        """Remove the temporary preprocessing cache (if the Retriever made one)."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "Retriever":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ modalities
    @property
    def image_modalities(self) -> tuple[str, ...]:
        return tuple(self.spec.image_modalities)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Every modality of the model (image modalities, then 'report', 'clinical')."""
        return tuple(self.spec.modalities)

    @property
    def max_series(self) -> int:
        return int(self.config.data.max_series)

    def _known(self) -> str:
        extra = [x for x in (REPORT, CLINICAL) if x in self.modalities]
        s = f"this model's image modalities are {list(self.image_modalities)}"
        if extra:
            s += f" (and {' and '.join(repr(x) for x in extra)}, given separately)"
        return s

    def _check_images(self, images) -> dict[str, list[str]]:
        if images is None:
            return {}
        if not isinstance(images, Mapping):
            raise InputError(f"images must be a dict modality → list of paths, got {type(images).__name__}")
        out: dict[str, list[str]] = {}
        for m, paths in images.items():
            if m not in self.image_modalities:
                hint = ""
                if m == REPORT:
                    hint = " (give the report text with report=...)"
                elif m == CLINICAL:
                    hint = " (give clinical fields with clinical=...)"
                raise InputError(f"unknown image modality{hint}; {self._known()}", modality=str(m))
            if paths is None:
                continue
            if isinstance(paths, (str, os.PathLike)):
                paths = [paths]
            lst = []
            for p in paths:
                if not isinstance(p, (str, os.PathLike)) or not os.fspath(p):
                    raise InputError(f"expected a file or folder path, got {p!r}", modality=m)
                lst.append(os.path.abspath(os.fspath(p)))
            if len(lst) > self.max_series:
                log.warning("modality %r: %d series given, the model uses the first %d (data.max_series)",
                            m, len(lst), self.max_series)
            if lst:
                out[m] = lst
        return out

    def _check_clinical(self, clinical) -> dict[str, Any]:
        if not clinical:
            return {}
        if CLINICAL not in self.modalities:
            raise InputError("this model has no clinical modality", modality=CLINICAL)
        if not isinstance(clinical, Mapping):
            raise InputError(f"clinical must be a dict field → value, got {type(clinical).__name__}",
                             modality=CLINICAL)
        numeric = list(self.config.data.clinical.numeric)
        categorical = {k: [str(x) for x in v] for k, v in dict(self.config.data.clinical.categorical).items()}
        out: dict[str, Any] = {}
        for name, value in clinical.items():
            if name in numeric:
                try:
                    v = float(value)
                except (TypeError, ValueError):
                    v = math.nan
                if not math.isfinite(v) or isinstance(value, bool):
                    raise InputError(f"clinical field {name!r} must be a finite number, got {value!r}",
                                     modality=CLINICAL)
                out[name] = v
            elif name in categorical:
                if str(value) not in categorical[name]:
                    raise InputError(f"clinical field {name!r}: {value!r} is not one of {categorical[name]}",
                                     modality=CLINICAL)
                out[name] = str(value)
            else:
                raise InputError(f"unknown clinical field {name!r}; known: {numeric + list(categorical)}",
                                 modality=CLINICAL)
        return out

    # ------------------------------------------------------------------ encoding
    def _check_other(self, other) -> dict[str, Any]:
        """Values of ``data.other_modalities`` (modalities of other registered kinds)."""
        if not other:
            return {}
        if not isinstance(other, Mapping):
            raise InputError(f"other must be a dict modality → value, got {type(other).__name__}")
        known = [n for n, _, _ in self.spec.extra]
        bad = [m for m in other if m not in known]
        if bad:
            raise InputError(f"unknown modality {bad[0]!r} of another kind; this model has {known}", modality=bad[0])
        return {m: v for m, v in other.items() if v is not None}

    def query_batch(self, images: Mapping[str, Sequence[str | os.PathLike]] | None = None,
                    report: str | None = None, *, clinical: Mapping[str, Any] | None = None,
                    other: Mapping[str, Any] | None = None) -> dict:
        """The one-case model batch of a query (layout of :meth:`Cohort.batch`).

        ``other``: values of modalities of other kinds (``data.other_modalities``), as the
        manifest's ``meta`` gives them, built into batch entries by their kind."""
        imgs = self._check_images(images)
        if report is not None:
            if REPORT not in self.modalities:
                raise InputError("this model has no report modality", modality=REPORT)
            if not isinstance(report, str):
                raise InputError(f"report must be a string, got {type(report).__name__}", modality=REPORT)
            try:
                check_report_text(report)     # not blank, not mostly control characters (docs/data.md)
            except InputError as e:
                raise e.with_context(modality=REPORT) from None
        meta = self._check_clinical(clinical)
        others = self._check_other(other)
        if not imgs and report is None and not meta and not others:
            raise InputError("no query modality given: give at least one image series or a report; "
                             + self._known())
        case = CaseEntries(QUERY_CASE, imgs, report, None, {}, {**meta, **others})
        data = self.config.data
        spatial_dims = int(data.spatial_dims)
        # Exactly as prepare_cohort: the first series of the reference modality, if given.
        ref_mod = data.reference_modality or None
        ref = case.images.get(ref_mod, [None])[0] if ref_mod else None
        arrays = {}
        self.last_notes = []
        for m in self.image_modalities:
            if m in imgs:
                said: list = []
                try:
                    arrays[m] = load_case_images(case, m, imgs[m], self.cache, self.preprocess, spatial_dims, ref,
                                                 b_value=data.dwi_b_value, notes=said,
                                                 max_voxels=int(data.max_voxels))
                except InputError as e:
                    raise _strip_case(e) from None
                self.last_notes += [f"{m}: {Path(path).name}: {x}" for path, x in said]
                if arrays[m].shape[0] > self.max_series:
                    self.last_notes.append(f"{m}: {arrays[m].shape[0]} series, the model takes the first "
                                           f"{self.max_series} (data.max_series)")
        T = int(data.text.max_len)
        if report is not None and self.tokenizer is not None and data.report:
            tokens, token_mask = tokenize(self.tokenizer, [report], T)
            n = int(token_lengths(self.tokenizer, [report])[0])
            if n > T:
                self.last_notes.append(f"report: {n} tokens truncated to data.text.max_len={T}")
        else:
            tokens = np.zeros((1, T), np.int32)
            token_mask = np.zeros_like(tokens)
        num, num_mask, cat, cat_mask = clinical_arrays([case], list(data.clinical.numeric),
                                                        dict(data.clinical.categorical))
        num, _ = standardize_clinical(num, num_mask, self.clinical_stats)
        others = case_arrays([case], case_builders(self.config))
        if needs_features(self.config):
            # the frozen image features, exactly as the cohort's (mmvae.runs.trained.with_features)
            fcfg = FeatureConfig.from_config(self.config)
            extractor = FeatureExtractor.get(fcfg)
            for m in self.image_modalities:
                f = np.zeros((1, self.max_series, fcfg.dim(spatial_dims)), np.float32)
                if m in arrays:
                    try:
                        got = case_features(imgs[m], self.cache, extractor, spatial_dims=spatial_dims,
                                            b_value=data.dwi_b_value, modality=m)
                    except InputError as e:
                        raise _strip_case(e) from None
                    n = min(self.max_series, got.shape[0], arrays[m].shape[0])
                    f[0, :n] = got[:n]
                others[f"features/{m}"] = f
        cohort = Cohort(case_ids=[QUERY_CASE], image_modalities=self.image_modalities,
                        images={m: [arrays.get(m)] for m in self.image_modalities}, reports=[report],
                        arrays=fixed_arrays(tokens, token_mask, num, num_mask, cat, cat_mask, others),
                        labels=[{}], shape=tuple(self.preprocess.shape), max_series=self.max_series,
                        clinical_stats=self.clinical_stats)
        return cohort.batch([0])

    def _stats(self) -> dict | None:
        return self.index.identity.get("standardize") if self.index is not None else self.standardize

    def _identity(self) -> dict:
        """The identity the query's vector must match: the index's ({} before there is one)."""
        return self.index.identity if self.index is not None else {}

    def encode(self, images=None, report=None, *, clinical=None,
               other=None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Like :meth:`encode_query`, also returning the modalities the model saw."""
        batch = self.query_batch(images, report, clinical=clinical, other=other)
        emu, elv, present = jax.device_get(self._encode(batch))
        present = np.asarray(present)
        if not present.any():
            raise InputError("no usable modality in the query (every input was dropped by the model)")
        m = len(self.spec.query_modalities)
        frozen, widths = None, ()
        self.last_blocks = None
        if "features" in self.embedding:
            frozen, widths = stack_frozen(jax.device_get(self._frozen(batch)), self.spec.query_modalities, 1)
            expert_w = self.spec.embedding_dim - (m - 1) * self.spec.private_dim
            self.last_blocks = vector_blocks(self.embedding, self.spec.query_modalities, expert_w, widths)
            blocks = self._identity().get("blocks")
            have = vector_blocks("features", self.spec.query_modalities, 0, widths)
            if blocks is not None and have != [list(b) for b in blocks][m if "experts" in self.embedding else 0:]:
                raise ConfigError(f"the query's frozen features {have} differ from the index's {blocks}: the index was "
                                  "built with other data.features or another text model; re-embed and re-index")
        # The query's vector, as the indexed cases' (kind, standardisation).
        mu, lv = case_vectors(np.asarray(emu)[:, :m], np.asarray(elv)[:, :m], present[:, :m], self.spec.fusion,
                              self.embedding, self._stats(), self.spec.private_dim, frozen, widths)
        mv, ld = posterior_spread(lv)
        dis = expert_disagreement(np.asarray(emu)[:, :m], np.asarray(elv)[:, :m], present[:, :m])
        self.last_uncertainty = {"mean_variance": float(mv[0]), "log_det": float(ld[0]),
                                 "disagreement": None if np.isnan(dis[0]) else float(dis[0])}
        names = [m for m, p in zip(self.modalities, present[0]) if p > 0]
        return mu[0].astype(np.float32), lv[0].astype(np.float32), names

    def encode_query(self, images: Mapping[str, Sequence[str | os.PathLike]] | None = None,
                     report: str | None = None, *,
                     clinical: Mapping[str, Any] | None = None,
                     other: Mapping[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The query's retrieval vector ``(mu, logvar)``, each ``(D,)`` float32, from the given
        modalities: the fused posterior (``D = E``) or the experts side by side (``retrieval.embedding``,
        :func:`mmvae.retrieval.embed.case_vectors`), mapped as the indexed cases.

        Args:
          images: image modality → list of sources (NIfTI file, DICOM series folder or
            PNG; a single path is accepted too). Several sources of one modality are
            several series (the first ``data.max_series`` are used).
          report: report text (tokenised with the run's tokenizer).
          clinical: clinical fields of the run's config, e.g. ``{'age': 63, 'sex': 'F'}``.
          other: values of modalities of other kinds (``data.other_modalities``).

        Raises:
          InputError: nothing given; an unknown modality (the message lists the known
            ones); a file that fails to load or preprocess (naming modality and file).
        """
        mu, lv, _ = self.encode(images, report, clinical=clinical, other=other)
        return mu, lv

    # ------------------------------------------------------------------ search
    def _check_k(self, k) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 1:
            raise InputError(f"k must be an integer ≥ 1 (got {k!r})")
        if int(k) > self.index.size:
            raise InputError(f"k={int(k)} is larger than the index ({self.index.size} cases)")
        return int(k)

    def apply_feedback(self, mu, feedback: Mapping[str, Sequence[str]] | None) -> np.ndarray:
        """Rocchio-moved query mean: ``α·mu + β·mean(relevant) − γ·mean(nonrelevant)``
        over the index's stored means of the marked cases (weights ``retrieval.rocchio``)."""
        mu = np.asarray(mu, np.float32)
        if not feedback:
            return mu
        if not isinstance(feedback, Mapping):
            raise InputError("feedback must be a dict {'relevant': [case ids], 'nonrelevant': [case ids]}")
        bad = [k for k in feedback if k not in FEEDBACK_KEYS]
        if bad:
            raise InputError(f"unknown feedback key(s) {bad}; use {list(FEEDBACK_KEYS)}")

        def ids(key):
            v = feedback.get(key) or []
            v = [v] if isinstance(v, str) else list(v)
            return [str(x) for x in v]

        rel, non = ids("relevant"), ids("nonrelevant")
        both = sorted(set(rel) & set(non))
        if both:
            raise InputError(f"case(s) marked both relevant and non-relevant: {both}")
        if not rel and not non:
            return mu
        rel_mu = self._marked_mean(rel) if rel else None
        non_mu = self._marked_mean(non) if non else None
        r = self.config.retrieval.rocchio
        return rocchio(mu, rel_mu, non_mu, float(r.alpha), float(r.beta), float(r.gamma)).astype(np.float32)

    def _marked_mean(self, ids: list[str]) -> np.ndarray:
        """Mean ``(1, D)`` of the stored vectors of the marked cases; with per-expert vectors each
        modality's block is averaged over the marked cases that have it (an absent block, 0, would
        shrink the query's block)."""
        mu = self.index.embeddings(ids)[0]
        if self.embedding == "fused":
            return mu.mean(0, keepdims=True)
        mods = list(self.spec.query_modalities)
        if self.embedding == "experts":
            blocks = [(m, mu.shape[1] // len(mods)) for m in mods]
        else:
            blocks = [(m, int(w)) for m, w in self.index.identity["blocks"]]
        have = [self.index.metadata(c).get("modalities", []) for c in ids]
        w = np.concatenate([np.repeat(np.asarray([[m in h] for h in have], np.float32), width, axis=1)
                            for m, width in blocks], 1)
        return ((mu * w).sum(0) / np.maximum(w.sum(0), 1.0))[None].astype(np.float32)

    def search_embedding(self, mu, logvar=None, k: int = 10, filter=None, exclude=None,  # noqa: A002
                         feedback=None, rerank: str | None = None,
                         modalities: Sequence[str] | None = None) -> list[Result]:
        """Search with an already encoded query posterior (see :meth:`search`).

        ``modalities``: the modalities the query was encoded from; the cases are compared on
        the dimensions those inform (their blocks of per-expert vectors, or the shared and
        their private latent blocks: :func:`mmvae.retrieval.embed.query_dims`). None: every
        dimension."""
        k = self._check_k(k)
        if rerank not in RERANKS:
            raise InputError(f"rerank must be one of {list(RERANKS)} (got {rerank!r})")
        q = self.apply_feedback(mu, feedback)
        qlv = None if logvar is None else np.asarray(logvar, np.float32)[None]
        dims = None
        if modalities is not None:
            dims = query_dims({"private_dim": self.spec.private_dim, "shared_dim": self.spec.latent_dim,
                               "embedding": self.embedding, "latent_dim": self.index.latent_dim,
                               "blocks": self.index.identity.get("blocks")},
                              self.spec.query_modalities, list(modalities))
        return self.index.search(q[None], k, query_logvar=qlv, filter=filter, exclude=exclude,
                                 rerank=rerank, dims=dims)[0]

    # ------------------------------------------------------------------ hybrid (legs fused)
    def fusion_method(self, rerank: str | None = None, mode: str | None = None) -> str | None:
        """How queries are ranked: None (one vector search) or ``'weighted'`` / ``'rrf'`` (the
        index's legs fused, :mod:`mmvae.retrieval.hybrid`), from ``mode`` (default
        ``retrieval.fusion``; ``auto``: fused when the index has a lexical leg or fitted weights).
        A posterior re-ranking (``rerank``) is a vector search."""
        mode = str(mode or self.config.retrieval.get("fusion", "auto"))
        if rerank is not None or mode == "vector":
            return None
        if mode == "auto":
            return "weighted" if (self.index.lexical is not None or self.index.fusion) else None
        return mode

    def hybrid_query(self, mu, modalities: Sequence[str], report: str | None = None,
                     tokens: Sequence[str] | None = None):
        """A :class:`~mmvae.retrieval.hybrid.HybridQuery` of an encoded query (``report``: its
        text, tokenised for the lexical leg; or ``tokens``)."""
        from mmvae.retrieval.hybrid import HybridQuery
        from mmvae.retrieval.index.lexical import tokenize
        toks = list(tokens) if tokens is not None else (tokenize(report) if report else None)
        return HybridQuery(np.asarray(mu, np.float32).reshape(-1), list(modalities), toks or None)

    def case_query(self, case_id: str):
        """The :class:`~mmvae.retrieval.hybrid.HybridQuery` of an indexed case: its stored vector,
        its modalities and its report's stored tokens."""
        mu = self.index.embeddings([case_id])[0][0]
        row = self.index._row_of_case[case_id]
        toks = self.index.lexical.tokens[row] if self.index.lexical is not None else None
        return self.hybrid_query(mu, self.index.metadata(case_id).get("modalities", []), tokens=toks)

    def _default_weights(self, weights):
        if weights is not None:
            return weights
        w = str(self.config.retrieval.get("fusion_weights", "") or "")
        return w or None

    def search_hybrid(self, query, k: int = 10, *, weights=None, method: str = "weighted", filter=None,  # noqa: A002
                      exclude=None, feedback: Mapping[str, Sequence[str]] | None = None):
        """Fused search of a :class:`~mmvae.retrieval.hybrid.HybridQuery` → ``(results, info)``.

        ``weights``: None (``retrieval.fusion_weights``, else the index's fitted default, else
        uniform), ``'uniform'``, a fitted label or ``{leg: weight}``. ``feedback``: one round of
        marks: the query vector moves by Rocchio (:meth:`apply_feedback`) and the leg weights by
        :func:`~mmvae.retrieval.hybrid.feedback_weights`; ``info['weights']`` holds the weights
        used (pass them back for the next round). Results are
        :class:`~mmvae.retrieval.hybrid.HybridResult` (per-leg ``contributions``)."""
        from mmvae.retrieval.hybrid import hybrid_search
        k = self._check_k(k)
        weights = self._default_weights(weights)
        if feedback:
            query, weights = self.feedback_round(query, feedback, weights=weights, method=method)
        return hybrid_search(self.index, query, k, weights=weights, method=method, filter=filter, exclude=exclude,
                             modalities=self.spec.query_modalities)

    def feedback_round(self, query, feedback: Mapping[str, Sequence[str]], *, weights=None, method="weighted"):
        """``(moved query, leg weights)`` after one round of marks on the results of ``query``
        under ``weights``: Rocchio on the vector, the Hedge update on the weights
        (``retrieval.feedback_rate``)."""
        from mmvae.retrieval.hybrid import HybridQuery, feedback_weights, resolve_weights
        from mmvae.retrieval.hybrid.fusion import normalise_weights
        from mmvae.retrieval.hybrid.search import active_legs, standardised_scores
        from mmvae.retrieval.hybrid.legs import index_legs
        legs = index_legs(self.index, self.spec.query_modalities)
        w_all, _ = resolve_weights(self.index, legs, self._default_weights(weights))
        names = [leg.name for leg in active_legs(legs, query)]
        w = normalise_weights(w_all, names)
        moved = self.apply_feedback(query.vector, feedback)
        rel = [str(x) for x in (feedback.get("relevant") or [])]
        non = [str(x) for x in (feedback.get("nonrelevant") or [])]
        zr = standardised_scores(self.index, query, rel, self.spec.query_modalities) if rel else {}
        zn = standardised_scores(self.index, query, non, self.spec.query_modalities) if non else {}
        new_w = feedback_weights(w, zr, zn, eta=float(self.config.retrieval.get("feedback_rate", 1.0)))
        full = {n: new_w.get(n, 0.0) for n in w_all}
        return HybridQuery(np.asarray(moved, np.float32).reshape(-1), query.modalities, query.tokens), full

    def search(self, images: Mapping[str, Sequence[str | os.PathLike]] | None = None,
               report: str | None = None, k: int = 10, filter=None, exclude=None,  # noqa: A002
               feedback: Mapping[str, Sequence[str]] | None = None, rerank: str | None = None, *,
               clinical: Mapping[str, Any] | None = None, other: Mapping[str, Any] | None = None) -> list[Result]:
        """The ``k`` indexed cases most similar to the query, best first.

        Args:
          images, report, clinical, other: the query (see :meth:`encode_query`).
          k: results, 1 ≤ k ≤ cases left after filter/exclude (else InputError).
          filter: index filter, e.g. ``{'has': 'dwi'}``, ``{'lacks': ['t1']}``,
            ``{'labels': {'class': 'glioma'}}`` or ``callable(meta) -> bool``.
          exclude: case ids never returned.
          feedback: ``{'relevant': [case ids], 'nonrelevant': [case ids]}``: the query
            mean is moved by Rocchio before searching (:meth:`apply_feedback`).
          rerank: None, ``'bhattacharyya'`` or ``'expected_likelihood'``: re-rank the
            candidates with the query's full posterior.

        With a hybrid index (:meth:`fusion_method`) the legs are fused (:meth:`search_hybrid`)
        and the results carry each leg's contribution.
        """
        self._check_k(k)   # before the (expensive) encoding
        mu, lv, used = self.encode(images, report, clinical=clinical, other=other)
        method = self.fusion_method(rerank)
        if method is not None:
            return self.search_hybrid(self.hybrid_query(mu, used, report), k, method=method, filter=filter,
                                      exclude=exclude, feedback=feedback)[0]
        return self.search_embedding(mu, lv, k=k, filter=filter, exclude=exclude, feedback=feedback,
                                     rerank=rerank, modalities=used)

    # ------------------------------------------------------------------ index upkeep
    def add_case(self, case_id: str, images=None, report=None, *, clinical=None, other=None,
                 labels: Mapping | None = None) -> list[str]:
        """Encode a case and add it to the (in-memory) index; returns its modalities.
        Call :meth:`save` to write the index."""
        mu, lv, names = self.encode(images, report, clinical=clinical, other=other)
        self.index.add(mu[None], lv[None], [case_id], [{"modalities": names, "labels": dict(labels or {})}],
                       reports=[report])
        return names

    def remove(self, case_ids: Sequence[str] | str) -> None:
        """Remove cases from the (in-memory) index."""
        self.index.remove(case_ids)

    def save(self, folder: str | os.PathLike | None = None) -> Path:
        """Write the index (atomically) to ``folder`` (default: where it was loaded from)."""
        folder = folder if folder is not None else self.index_dir
        if folder is None:
            raise InputError("no index folder to save to")
        return self.index.save(folder)


# ====================================================================== option parsing
def parse_filter(specs: Sequence[str] | None) -> dict | None:
    """``['has=dwi', 'lacks=t1', 'label.class=glioma,abscess']`` → an index filter dict.

    Keys: ``has`` / ``has_any`` / ``lacks`` (comma-separated modalities, repeatable) and
    ``label.NAME`` (comma-separated accepted values).
    """
    if not specs:
        return None
    out: dict[str, Any] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        key = key.strip()
        values = [v.strip() for v in value.split(",") if v.strip()]
        if not sep or not values:
            raise InputError(f"--filter {spec!r} must look like KEY=VALUE[,VALUE...]")
        if key in ("has", "has_any", "lacks"):
            out.setdefault(key, [])
            out[key] += [v for v in values if v not in out[key]]
        elif key.startswith(("label.", "labels.")) and key.partition(".")[2]:
            out.setdefault("labels", {})[key.partition(".")[2]] = values if len(values) > 1 else values[0]
        else:
            raise InputError(f"--filter {spec!r}: unknown key {key!r}; use has=, has_any=, lacks= or label.NAME=")
    return out


def parse_feedback(specs: Sequence[str] | None) -> dict | None:
    """``['+c001,-c007', '+c012']`` → ``{'relevant': ['c001', 'c012'], 'nonrelevant': ['c007']}``."""
    if not specs:
        return None
    rel: list[str] = []
    non: list[str] = []
    for spec in specs:
        for item in (x.strip() for x in spec.split(",")):
            if not item:
                continue
            if item[0] not in "+-" or len(item) < 2:
                raise InputError(f"--feedback item {item!r} must be +CASE (relevant) or -CASE (non-relevant)")
            (rel if item[0] == "+" else non).append(item[1:])
    return {"relevant": rel, "nonrelevant": non}
