"""The lexical leg of a case index: BM25 over the report's words.

A report is cut into tokens by :func:`tokenize` (lower case; words, numbers and the
abbreviations radiology writes with digits and punctuation kept whole: ``t2``, ``5.2``,
``c5-6``, ``b=1000``), English stop words dropped except the negations. The tokens of every case are kept in the index folder (``lexical.jsonl``, one JSON
list per case in row order) and scored with Okapi BM25 in Lucene's form (Robertson & Zaragoza
2009; the variant of Kamphuis et al., ECIR 2020), by ``bm25s`` (Lù 2024):

.. math::

    \\mathrm{BM25}(q, d) = \\sum_{t \\in q} \\ln\\Big(1 + \\frac{N - n_t + 0.5}{n_t + 0.5}\\Big)
        \\frac{f_{t,d}}{f_{t,d} + k_1 (1 - b + b\\,|d| / \\overline{|d|})}

``N`` cases, ``n_t`` of them with the term, ``f_{t,d}`` its count in the case's report, ``|d|``
the report's length in tokens; ``k1 = 1.2``, ``b = 0.75``. A case without a report has no
tokens and scores 0. The BM25 matrix is rebuilt from the tokens when the index is opened or its
cases change (tens of milliseconds per thousand reports), so adding and removing cases keeps the
leg exact.
"""
from __future__ import annotations

import json
import re
from typing import Sequence

import numpy as np

from mmvae.errors import IndexError_, InputError

__all__ = ["tokenize", "LexicalLeg", "STOP_WORDS", "K1", "B"]

K1, B = 1.2, 0.75

# English function words (the common IR list), without the negations a report turns on.
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself of off on once only or other our ours ourselves out over own same she should so some such
than that the their theirs them themselves then there these they this those through to too under
until up very was we were what when where which while who whom why will with would you your yours
yourself yourselves
""".split())

# A token: letters/digits, joined by . - / + = when a letter or digit follows (t2-weighted, 5.2,
# c5-6, b=1000, t1+c); the parts of a hyphen/slash compound are emitted too.
_TOKEN = re.compile(r"[a-z0-9]+(?:[.\-/+=][a-z0-9]+)*")


def tokenize(text: str | None) -> list[str]:
    """Tokens ``list[str]`` of a report: lower-cased ``[a-z0-9]`` runs joined by ``. - / + =``
    (numbers and abbreviations kept whole: ``5.2``, ``t2-weighted``, ``b=1000``), plus the parts
    of ``-``/``/`` compounds (``t2-weighted`` → ``t2-weighted``, ``t2``, ``weighted``); stop words
    (:data:`STOP_WORDS`, negations kept) and one-letter words dropped (one digit is kept).
    ``None`` → ``[]``."""
    if not text:
        return []
    out: list[str] = []
    for tok in _TOKEN.findall(str(text).lower()):
        parts = [tok]
        if len(re.split(r"[-/]", tok)) > 1:
            parts += [p for p in re.split(r"[-/]", tok) if p]
        for p in parts:
            if p in STOP_WORDS or (len(p) == 1 and not p.isdigit()):
                continue
            out.append(p)
    return out


class LexicalLeg:
    """Report tokens of the index's cases (row order) and their BM25 scorer.

    ``tokens``: one token list per case (``[]``: no report)."""

    def __init__(self, tokens: Sequence[Sequence[str]]):
        self.tokens = [list(map(str, t)) for t in tokens]
        self._bm25 = None

    def __len__(self) -> int:
        return len(self.tokens)

    def has_text(self) -> np.ndarray:
        """bool ``(N,)``: the cases with at least one token."""
        return np.array([bool(t) for t in self.tokens], dtype=bool)

    def _model(self):
        if self._bm25 is None:
            import bm25s
            m = bm25s.BM25(k1=K1, b=B, method="lucene")
            m.index([t for t in self.tokens], show_progress=False)
            self._bm25 = m
        return self._bm25

    def scores(self, query_tokens: Sequence[str]) -> np.ndarray:
        """BM25 scores float32 ``(N,)`` of every case for the query's tokens (0 for a case without
        a report; all 0 for a query none of whose tokens is in any report)."""
        q = [t for t in query_tokens if t]
        if not self.tokens:
            return np.zeros(0, np.float32)
        if not q:
            return np.zeros(len(self.tokens), np.float32)
        return np.asarray(self._model().get_scores(q), np.float32)

    # ------------------------------------------------------------------ upkeep
    def add(self, tokens: Sequence[Sequence[str]]) -> None:
        self.tokens += [list(map(str, t)) for t in tokens]
        self._bm25 = None

    def keep(self, mask: np.ndarray) -> None:
        """Keep the rows where ``mask (N,)`` is true (the cases left after a removal)."""
        self.tokens = [t for t, k in zip(self.tokens, mask) if k]
        self._bm25 = None

    # ------------------------------------------------------------------ storage
    def dumps(self) -> str:
        """``lexical.jsonl``: one JSON list of tokens per case, row order."""
        return "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in self.tokens)

    @classmethod
    def loads(cls, text: str, count: int) -> "LexicalLeg":
        """Read :meth:`dumps`; IndexError_ unless it holds ``count`` lists of strings."""
        rows = []
        try:
            for line in text.splitlines():
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, list) or not all(isinstance(t, str) for t in row):
                        raise ValueError("a line is not a list of strings")
                    rows.append(row)
        except ValueError as e:
            raise IndexError_(f"index file lexical.jsonl is malformed ({e})") from None
        if len(rows) != count:
            raise IndexError_(f"lexical.jsonl has {len(rows)} cases, index.json says {count}")
        return cls(rows)


def query_tokens(text: str) -> list[str]:
    """Tokens of a text query; InputError when nothing searchable is left (empty, or only stop
    words and punctuation)."""
    toks = tokenize(text)
    if not toks:
        raise InputError("the text query has no searchable word (empty, or only stop words and punctuation)",
                         modality="report")
    return toks
