"""Which series of a study is which modality of the model: stated rules, every decision logged.

A rules file is JSON::

    {"rules": [
      {"modality": "adc",  "description": "adc"},
      {"modality": "adc",  "attributes": {"ImageType": "\\\\bADC\\\\b"}},
      {"modality": "dwi",  "description": "diff.*calc.?bval|trace|dwi", "exclude": {"ImageType": "ADC"}},
      {"modality": "t2",   "description": "t2", "exclude": {"SeriesDescription": "sag|cor|flair"}}
    ]}

A rule matches a series when every given condition holds:

* ``description``: regex searched (case-insensitive) in the SeriesDescription, then the
  ProtocolName, each also with everything but letters and digits removed
  (``t2_tse_tra`` → ``t2tsetra``), as :mod:`mmvae.data.scan` does for folders;
* ``attributes``: keyword → regex searched (case-insensitive) in the attribute's value
  (multi-valued attributes joined with ``\\``, e.g. ImageType ``DERIVED\\PRIMARY\\DIFFUSION\\ADC``;
  numbers as text, e.g. DiffusionBValue ``1000``); an absent attribute does not match;
* ``exclude``: keyword → regex; the rule does not match when any of them is found.

Rules are tried in order; the first that matches gives the series its modality. Rules naming
a modality the model does not have are ignored. When several series get the same modality,
the one matched by the earliest rule wins (the rules' order is a stated preference, e.g. the
computed high-b image before the acquired multi-b series); among series the same rule matches,
the DICOM folder loader's rule decides (:func:`mmvae.data.io.series_preference`): the most
instances, then the higher SeriesNumber, then the lower UID, so a 3-image localizer described
``t2_tse_tra`` never beats the 24-image T2. The choice and its reason are logged, the others
as not used. Series matching no rule are skipped (logged).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from mmvae.data.io import preference_reason, series_preference
from mmvae.errors import InputError

__all__ = ["Rule", "SeriesInfo", "DEFAULT_RULES", "load_rules", "map_series"]

# Brain and prostate MRI. Order matters: derived maps (ADC) before diffusion, the computed
# high-b image before acquired multi-b series, contrast-enhanced T1 before T1, FLAIR before T2.
DEFAULT_RULES: tuple[dict, ...] = (
    {"modality": "adc", "attributes": {"ImageType": r"(^|\\)ADC(\\|$)"}},
    {"modality": "adc", "description": r"adc|apparent"},
    {"modality": "dwi", "description": r"calc.?bval", "exclude": {"ImageType": r"(^|\\)ADC(\\|$)"}},
    {"modality": "dwi", "description": r"trace|dwi|diff", "attributes": {"ImageType": r"TRACEW|DIFFUSION"},
     "exclude": {"ImageType": r"(^|\\)ADC(\\|$)"}},
    {"modality": "dwi", "description": r"dwi|diff|trace", "exclude": {"SeriesDescription": r"adc"}},
    {"modality": "flair", "description": r"flair|dark.?fluid|t2.?ir"},
    {"modality": "t1ce", "description": r"t1.*(post|gd|gad|ce\b|\+c|contrast|kontrast)|(post|gd|gad).*t1|t1c\b"},
    {"modality": "t1", "description": r"t1|mprage|spgr|tfl3d.*t1"},
    {"modality": "t2", "description": r"t2.*(tra|ax)|t2", "exclude": {"SeriesDescription": r"sag|cor|flair|star|\*"}},
)


@dataclass(frozen=True)
class Rule:
    modality: str
    description: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)
    exclude: Mapping[str, str] = field(default_factory=dict)
    number: int = 0      # position in the rules list (1-based), for the log

    def text(self) -> str:
        parts = []
        if self.description:
            parts.append(f"description /{self.description}/")
        parts += [f"{k} /{v}/" for k, v in self.attributes.items()]
        parts += [f"not {k} /{v}/" for k, v in self.exclude.items()]
        return f"rule {self.number} ({' and '.join(parts) or 'any series'} → {self.modality})"


@dataclass
class SeriesInfo:
    """A series of a study as the archive lists it, with its first instance's attributes."""

    study_uid: str
    series_uid: str
    description: str = ""
    number: int | None = None
    instances: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)   # keyword → value (first instance)

    def name(self) -> str:
        return (f"series {self.number if self.number is not None else '?'} {self.description!r} "
                f"({self.instances} images) {self.series_uid}")


def _rule(d: Mapping, i: int, where: str) -> Rule:
    if not isinstance(d, Mapping) or not isinstance(d.get("modality"), str) or not d["modality"]:
        raise InputError(f"rule {i}: needs a 'modality' string", path=where)
    unknown = set(d) - {"modality", "description", "attributes", "exclude"}
    if unknown:
        raise InputError(f"rule {i}: unknown key(s) {sorted(unknown)}", path=where)
    for key in ("attributes", "exclude"):
        if not isinstance(d.get(key, {}), Mapping):
            raise InputError(f"rule {i}: {key!r} must be an object keyword → regex", path=where)
    pats = [d.get("description")] + list(dict(d.get("attributes", {})).values()) + list(dict(d.get("exclude", {})).values())
    for p in pats:
        if p is None:
            continue
        try:
            re.compile(str(p))
        except re.error as e:
            raise InputError(f"rule {i}: bad regex {p!r} ({e})", path=where) from None
    return Rule(d["modality"], d.get("description"), dict(d.get("attributes", {})), dict(d.get("exclude", {})), i)


def load_rules(path: str | os.PathLike | None = None) -> list[Rule]:
    """The rules of a JSON file (module doc), or :data:`DEFAULT_RULES` when ``path`` is None.

    Raises:
      InputError: unreadable file, invalid JSON, a rule without a modality, an unknown key or a
        bad regex (naming the file and the rule's number).
    """
    if path is None:
        return [_rule(d, i + 1, "default rules") for i, d in enumerate(DEFAULT_RULES)]
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"cannot read the rules file ({e.strerror})", path=str(p)) from None
    except json.JSONDecodeError as e:
        raise InputError(f"rules file is not valid JSON (line {e.lineno}: {e.msg})", path=str(p)) from None
    rules = doc.get("rules") if isinstance(doc, Mapping) else None
    if not isinstance(rules, list) or not rules:
        raise InputError("rules file needs a non-empty list under 'rules'", path=str(p))
    return [_rule(d, i + 1, str(p)) for i, d in enumerate(rules)]


def _value(info: SeriesInfo, keyword: str) -> str | None:
    if keyword == "SeriesDescription":
        return info.description or info.attributes.get(keyword)
    v = info.attributes.get(keyword)
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return "\\".join(str(x) for x in v)
    return str(v)


def _found(pattern: str, text: str | None) -> bool:
    if text is None:
        return False
    return re.search(pattern, text, re.IGNORECASE) is not None


def _matches(rule: Rule, info: SeriesInfo) -> bool:
    if rule.description is not None:
        texts = [info.description, str(info.attributes.get("ProtocolName") or "")]
        texts += [re.sub(r"[^a-z0-9]", "", t.lower()) for t in texts]
        if not any(_found(rule.description, t) for t in texts if t):
            return False
    if any(not _found(pat, _value(info, kw)) for kw, pat in rule.attributes.items()):
        return False
    return not any(_found(pat, _value(info, kw)) for kw, pat in rule.exclude.items())


def map_series(series: Sequence[SeriesInfo], rules: Sequence[Rule],
               modalities: Sequence[str]) -> tuple[dict[str, SeriesInfo], list[str]]:
    """``modality → chosen series`` for the model's image ``modalities``, and every decision in
    words (one line per series)."""
    usable = [r for r in rules if r.modality in modalities]
    matched: dict[str, list[tuple[int, SeriesInfo, Rule]]] = {}
    notes: list[str] = []
    for s in series:
        rule = next((r for r in usable if _matches(r, s)), None)
        if rule is None:
            notes.append(f"{s.name()}: no rule matches; skipped")
            continue
        matched.setdefault(rule.modality, []).append((rule.number, s, rule))
    chosen: dict[str, SeriesInfo] = {}
    for m in modalities:
        cands = sorted(matched.get(m, []),
                       key=lambda x: (x[0], *series_preference(x[1].instances, x[1].number, x[1].series_uid)))
        if not cands:
            continue
        _, best, rule = cands[0]
        chosen[m] = best
        same = [c for c in cands if c[0] == rule.number]
        why = (f" (of {len(same)} series this rule matches: {preference_reason([c[1].instances for c in same])}, "
               "as for a DICOM folder)" if len(same) > 1 else "")
        notes.append(f"{best.name()} → {m} by {rule.text()}{why}")
        for _, other, r in cands[1:]:
            notes.append(f"{other.name()}: also {m} by {r.text()}; not used ({best.name()} ranks first)")
    return chosen, notes
