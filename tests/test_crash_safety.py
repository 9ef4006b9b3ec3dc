"""Nothing half-written survives a kill: a child process is SIGKILLed at several points of an
index save, a cache write and a checkpoint save; readers then find the last complete state and
the next write cleans up."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mmvae.retrieval.index import build_index, load_index

ROOT = Path(__file__).resolve().parents[1]

KILL = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, {root!r})
    def kill_on(module, name, nth=1, when=lambda *a, **k: True):
        real = getattr(module, name)
        seen = [0]
        def wrapper(*a, **k):
            if when(*a, **k):
                seen[0] += 1
                if seen[0] == nth:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        setattr(module, name, wrapper)
''')


def run_killed(body: str, tmp: Path) -> None:
    script = KILL.format(root=str(ROOT)) + textwrap.dedent(body)
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp, capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, f"the child was not killed (rc {p.returncode}):\n{p.stdout}\n{p.stderr}"


def _index(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return build_index(rng.normal(size=(n, 8)).astype(np.float32), np.zeros((n, 8), np.float32),
                       [f"c{i}" for i in range(n)], kind="flat")


SAVE_NEW = '''
    import numpy as np
    from mmvae.retrieval import index as I
    rng = np.random.default_rng(1)
    new = I.build_index(rng.normal(size=(20, 8)).astype(np.float32), np.zeros((20, 8), np.float32),
                        [f"c{{i}}" for i in range(20)], kind="flat")
    {patch}
    new.save("idx")
'''


@pytest.mark.parametrize("point, patch, expect", [
    ("while writing files", "kill_on(I, 'atomic_save_npy')", 10),
    ("between the two renames", "kill_on(I.os, 'rename', nth=2)", 10),
    ("before the old folder is removed", "kill_on(I.shutil, 'rmtree', when=lambda p, *a, **k: '.old-' in str(p))", 20),
])
def test_index_save_killed_anywhere_leaves_a_complete_index(tmp_path, point, patch, expect):
    _index(10, 0).save(tmp_path / "idx")
    run_killed(SAVE_NEW.format(patch=patch), tmp_path)
    assert load_index(tmp_path / "idx").size == expect                  # the last complete index
    _index(30, 2).save(tmp_path / "idx")                                # the next save cleans up
    assert load_index(tmp_path / "idx").size == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"], point


CACHE_WRITE = '''
    import numpy as np
    from mmvae.data import cache as C
    c = C.PreprocessCache("cache")
    kill_on(C, 'atomic_write_text')                                     # after the array, before its sidecar
    c.get_or_build(c.key("a"), lambda: np.full((2, 3), 7.0, np.float32))
'''


def test_cache_write_killed_is_rebuilt_and_temps_cleaned(tmp_path):
    run_killed(CACHE_WRITE, tmp_path)
    from mmvae.data.cache import PreprocessCache
    old = time.time() - 3600
    for p in (tmp_path / "cache").rglob("*"):
        os.utime(p, (old, old))                                         # the killed writer's files are old
    (tmp_path / "cache" / "ab").mkdir(exist_ok=True)
    (tmp_path / "cache" / "ab" / ".x.npy.tmp-123.npy").write_bytes(b"half")
    os.utime(tmp_path / "cache" / "ab" / ".x.npy.tmp-123.npy", (old, old))
    c = PreprocessCache(tmp_path / "cache")
    assert c.removed_temps >= 1
    built = []
    arr = c.get_or_build(c.key("a"), lambda: built.append(1) or np.full((2, 3), 7.0, np.float32))
    assert built == [1] and float(arr[0, 0]) == 7.0                     # no sidecar: rebuilt, not trusted
    assert not [p for p in (tmp_path / "cache").rglob(".*tmp-*")]


CKPT = '''
    from mmvae.config import load_config
    from mmvae.data.synth import make_cohort
    from mmvae.runs import checkpoint as ck
    from mmvae.train.loop import train_and_evaluate
    c = load_config({tiny!r}, ["--config.train.steps=4", "--config.train.checkpoint_every=2"])
    c.data.manifest = str(make_cohort("data", 24, seed=0, shape=(16, 16, 16), spacing=(4.0, 4.0, 4.0)))
    import os
    # the second checkpoint (step 4): killed with every file written, just before orbax commits it
    kill_on(os, {fn!r}, when=lambda src, *a, **k: "tmp" in str(src) and str(src).rstrip("/").split("/")[-1].startswith("4"))
    train_and_evaluate(c, "run", show_progress=False)
'''


def test_checkpoint_save_killed_resumes_from_the_last_complete_one(tmp_path):
    run_killed(CKPT.format(tiny=str(ROOT / "configs" / "tiny.py"), fn="rename"), tmp_path)
    from mmvae.runs.checkpoint import latest_meta
    from mmvae.runs.trained import load_trained
    names = sorted(x.name for x in (tmp_path / "run" / "checkpoints").iterdir())
    assert any(n.startswith("4") and "tmp" in n for n in names), names        # killed mid-save of step 4
    assert latest_meta(tmp_path / "run")[0] == 2
    *_, step = load_trained(tmp_path / "run", return_step=True)
    assert step == 2
    # resuming ignores the unfinished save and writes step 4 properly
    from mmvae.config import load_config
    from mmvae.train.loop import train_and_evaluate
    c = load_config(str(ROOT / "configs" / "tiny.py"), ["--config.train.steps=4", "--config.train.checkpoint_every=2"])
    c.data.manifest = str(tmp_path / "data" / "manifest.jsonl")
    assert train_and_evaluate(c, tmp_path / "run", show_progress=False)["step"] == 4
    assert load_trained(tmp_path / "run", return_step=True)[-1] == 4
    assert not [x for x in (tmp_path / "run" / "checkpoints").iterdir() if "tmp" in x.name]
