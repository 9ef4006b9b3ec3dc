"""The modality registry: kind name → :class:`~mmvae.models.modalities.kind.Kind`.

A new kind of modality is one new module in this package (its encoder, decoder,
likelihood and batch entries; see :mod:`~mmvae.models.modalities.kind`) plus one entry in
``_BUILT_IN`` below, or :func:`register` from outside the package. A model spec's
modalities are those of every registered kind (``image`` sequences, ``report``,
``clinical``, kinds named in ``spec.extra``), observed kinds first in registry order,
then the unobserved ones (the ``label``) — the order of the experts ``(B, M, ...)``.
"""
from __future__ import annotations

from mmvae.errors import ConfigError
from mmvae.models.modalities import clinical, image, label, report
from mmvae.models.modalities.kind import Kind

_BUILT_IN = (image.KIND, report.KIND, clinical.KIND, label.KIND)

KINDS: dict[str, Kind] = {k.name: k for k in _BUILT_IN}


def register(kind: Kind) -> Kind:
    """Add ``kind`` to the registry (ConfigError if its name is taken by another kind)."""
    if KINDS.get(kind.name, kind) is not kind:
        raise ConfigError(f"a modality kind named {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


def kinds_of(spec) -> dict[str, Kind]:
    """Modality name → its kind, in expert order (observed kinds first, each in registry order)."""
    unknown = sorted({k for _, k, _ in getattr(spec, "extra", ()) if k not in KINDS})
    if unknown:
        raise ConfigError(f"unknown modality kind(s) {unknown}; registered: {sorted(KINDS)}")
    pairs = [(m, kind) for observed in (True, False) for kind in KINDS.values() if kind.observed == observed
             for m in kind.modalities(spec)]
    names = [m for m, _ in pairs]
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate modality names: {tuple(names)}")
    return dict(pairs)
