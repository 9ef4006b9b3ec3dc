"""Archive scale (issue 33): sharded multi-process embedding, shard sets, the streaming index build.

- ``mmvae embed --out FOLDER`` run as 2 ``jax.distributed`` processes gives exactly the vectors of
  one process, in the same order, once merged;
- a sharded embed killed part-way (SIGKILL) and re-run, even with another number of processes,
  completes the same set; a folder of another plan is refused;
- the streaming build (``mmvae index --embeddings SHARDSET``) stopped at every stage, and killed,
  then re-run, writes the same index files byte for byte as an uninterrupted build; its exact kind
  ranks as the in-memory build; its memory stays bounded (peak RSS growth measured in a subprocess).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _kill import kill_when

from mmvae.errors import InputError
from mmvae.retrieval import shards as S
from mmvae.retrieval.embed import Embeddings
from mmvae.retrieval.index import build_index, load_index
from mmvae.retrieval.index import storage
from mmvae.retrieval.index.stream import build_from_shards, choose_kind, default_rerank_factor

CLI = [sys.executable, "-m", "mmvae.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same_embeddings(a: Embeddings, b: Embeddings) -> None:
    assert a.case_ids == b.case_ids and a.labels == b.labels and a.modalities == b.modalities
    for name in ("experts_mu", "experts_logvar", "present", "mu", "logvar"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.identity["standardize"] == b.identity["standardize"]
    assert a.identity["weights_digest"] == b.identity["weights_digest"]


def _digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------- sharded embedding
def test_two_processes_embed_exactly_the_single_process_vectors(tiny_indexed, tmp_path, monkeypatch):
    _, c, wd, emb, index_dir = tiny_indexed     # embed_cohort in one process, batches of 32
    out, port = tmp_path / "set", _free_port()
    procs = [subprocess.Popen(CLI + ["embed", "--workdir", str(wd), "--manifest", c.data.manifest, "--out", str(out),
                                     "--batch-size", "32", "--shard-size", "32",
                                     "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                                     "--process-id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    assert "process 0/2: encoded 1 shard(s)" in outs[0][0] and "process 1/2: encoded 1 shard(s)" in outs[1][0]
    info = json.loads((out / "shardset.json").read_text())
    assert [s["count"] for s in info["shards"]] == [32, 8] and info["count"] == 40
    merged = Embeddings.load(out)               # any reader of embeddings reads the folder
    _same_embeddings(merged, emb)
    # indexed streaming, the set answers a query by example exactly as the in-memory index of one file
    from mmvae.cli import main
    from mmvae.data.manifest import group_cases, read_manifest
    from mmvae.retrieval.query import Retriever
    assert main(["index", "--embeddings", str(out), "--out", str(tmp_path / "ix")]) == 0
    case = next(x for x in group_cases(read_manifest(c.data.manifest)) if len(x.images) == 3)
    images = {m: list(p) for m, p in case.images.items()}
    got = [(x.case_id, round(x.score, 4)) for x in Retriever.load(wd, tmp_path / "ix").search(images, k=5)]
    want = [(x.case_id, round(x.score, 4)) for x in Retriever.load(wd, index_dir).search(images, k=5)]
    assert got == want and got[0][0] == case.case_id
    monkeypatch.setattr(S, "_available_bytes", lambda: 1000)     # larger than the memory: refused before reading
    with pytest.raises(InputError, match="index it streaming"):
        Embeddings.load(out)



def test_killed_sharded_embed_resumes_with_another_process_count(tiny_indexed, tmp_path):
    _, c, wd, emb, _ = tiny_indexed
    ref = S.embed_shards(wd, c.data.manifest, tmp_path / "ref", shard_size=8, batch_size=8, show_progress=False)
    assert ref.complete and ref.encoded == [0, 1, 2, 3, 4]
    out = tmp_path / "set"
    # process 0 of 2 alone: shards 0, 2, 4; the set is not finished and says what is missing
    part = S.embed_shards(wd, c.data.manifest, out, shard_size=8, batch_size=8, process_index=0, process_count=2,
                          show_progress=False)
    assert part.encoded == [0, 2, 4] and not part.complete
    with pytest.raises(InputError, match=r"not finished \(2 of 5 shards missing, e.g. shard-00001.npz\)"):
        Embeddings.load(out)
    # a process of the CLI killed once it has written a shard of its own
    (out / S.shard_name(4)).unlink()
    rc = kill_when(CLI + ["embed", "--workdir", str(wd), "--manifest", c.data.manifest, "--out", str(out),
                          "--batch-size", "8", "--shard-size", "8"], (out / S.shard_name(1)).exists)
    assert rc == -signal.SIGKILL and not (out / S.DONE).exists()
    # the re-run, one process: reuses what is there, encodes the rest
    done = S.embed_shards(wd, c.data.manifest, out, shard_size=8, batch_size=8, show_progress=False)
    assert done.complete and set(done.reused) >= {0, 1, 2} and set(done.encoded) | set(done.reused) == set(range(5))
    _same_embeddings(Embeddings.load(out), Embeddings.load(tmp_path / "ref"))
    np.testing.assert_allclose(Embeddings.load(out).mu, emb.mu, atol=1e-4)     # batches of 8 vs 32
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".work"]
    # another plan in the same folder is refused, never mixed
    with pytest.raises(InputError, match="another plan .*shard_size, batch_size"):
        S.embed_shards(wd, c.data.manifest, out, shard_size=16, batch_size=16, show_progress=False)
    with pytest.raises(InputError, match="multiple of --batch-size"):
        S.embed_shards(wd, c.data.manifest, tmp_path / "x", shard_size=12, batch_size=8, show_progress=False)
    with pytest.raises(InputError, match="one shard of a shard set"):       # a part is not a cohort
        Embeddings.load(out / S.shard_name(0))
    (out / S.shard_name(3)).unlink()
    with pytest.raises(InputError, match=r"1 shard\(s\) of the finished set are missing \(e.g. shard-00003.npz\)"):
        Embeddings.load(out)


# ----------------------------------------------------------------------------- streaming build
def _synthetic_part(i: int, n: int, rng, m: int = 5, e: int = 8) -> Embeddings:
    mu = rng.standard_normal((n, m, e)).astype(np.float32)
    mu[:, :, 0] += rng.integers(0, 6, n)[:, None]          # some structure: 6 groups
    lv = (0.1 * rng.standard_normal((n, m, e))).astype(np.float32)
    present = (rng.random((n, m)) > 0.2).astype(np.float32)
    present[:, 0] = 1
    ids = [f"c{i}-{k}" for k in range(n)]
    return Embeddings(case_ids=ids, modalities=list("abcde"), experts_mu=mu, experts_logvar=lv, present=present,
                      mu=mu, logvar=lv, labels=[{"y": str(k % 7)} for k in range(n)],
                      identity={"shared_dim": e, "private_dim": 0, "weights_digest": "synthetic"},
                      fusion="poe").as_embedding("experts")


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    rng = np.random.default_rng(0)
    return S.write_shard_set([_synthetic_part(i, n, rng) for i, n in enumerate([1000, 1000, 700])],
                             tmp_path_factory.mktemp("scale") / "set")


def test_streaming_build_stopped_or_killed_gives_the_same_bytes(shard_set, tmp_path, monkeypatch):
    opts = dict(kind="ivfpq", nlist=16, m_pq=8, train_size=2000, show_progress=False)
    ref = build_from_shards(shard_set, tmp_path / "ref", **opts)
    want = _digests(ref)
    assert set(want) == {"index.faiss", "embeddings.npy", "metadata.jsonl", "index.json"}
    out = tmp_path / "ix"
    for stop in ("stats", "train", "part:0", "part:1"):
        build_from_shards(shard_set, out, stop_after=stop, **opts)
        assert not out.exists() and len(list(tmp_path.glob(".ix.build-*"))) == 1

    def die(tmp, folder):          # killed between the assembly and the rename
        raise KeyboardInterrupt
    monkeypatch.setattr(storage, "install", die)
    with pytest.raises(KeyboardInterrupt):
        build_from_shards(shard_set, out, **opts)
    monkeypatch.undo()
    build_from_shards(shard_set, out, **opts)
    assert _digests(out) == want and not list(tmp_path.glob(".ix.*"))
    # a SIGKILL of the command part-way, then the same command again
    killed = tmp_path / "killed"
    cmd = CLI + ["index", "--embeddings", str(shard_set.folder), "--out", str(killed), "--kind", "ivfpq",
                 "--nlist", "16", "--m-pq", "8", "--train-size", "2000"]
    rc = kill_when(cmd, lambda: bool(list(tmp_path.glob(".killed.build-*/trained.faiss"))), timeout=120, poll=0.005)
    assert rc == -signal.SIGKILL and not killed.exists()      # killed before it finished
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert _digests(killed) == {k: v for k, v in want.items() if k != "index.json"} | {"index.json": _digests(killed)["index.json"]}
    a, b = json.loads((ref / "index.json").read_text()), json.loads((killed / "index.json").read_text())
    assert a["files"] == b["files"] and a["params"] == b["params"] and a["identity"] == b["identity"]


def test_streaming_index_searches_as_the_in_memory_one(shard_set, tmp_path, monkeypatch):
    merged = shard_set.embeddings()
    flat = load_index(build_from_shards(shard_set, tmp_path / "flat", kind="flat", show_progress=False))
    assert flat.case_ids == merged.case_ids and flat.kind == "flat"
    ref = build_index(merged.mu, merged.logvar, merged.case_ids, kind="flat")
    q = merged.mu[::97]
    # statistics accumulated shard by shard equal the in-memory ones to float32 rounding
    np.testing.assert_allclose(np.asarray(flat._mu), merged.mu, atol=1e-4)
    got = [[r.case_id for r in rs] for rs in flat.search(q, 10)]
    exp = [[r.case_id for r in rs] for rs in ref.search(q, 10)]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exp)]) >= 0.99
    pq = load_index(build_from_shards(shard_set, tmp_path / "pq", kind="opq-ivfpq", nlist=16, show_progress=False))
    got = [[r.case_id for r in rs] for rs in pq.search(q, 10)]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exp)]) >= 0.85
    with pytest.raises(InputError, match=r"needs ≈ .* MB to build, over --max-build-gb=1e-05: raise --max-build-gb"):
        build_from_shards(shard_set, tmp_path / "big", kind="flat", max_build_gb=1e-5, show_progress=False)
    # PQ codes of many cases: a wider exact re-scoring by default, stored with the index (docs/scale.md)
    assert "rerank_factor" not in pq.params and default_rerank_factor("opq-ivfpq", 10 ** 6) == 32
    wide = load_index(build_from_shards(shard_set, tmp_path / "pq16", kind="ivfpq", nlist=16, rerank_factor=16,
                                        show_progress=False))
    assert wide.params["rerank_factor"] == 16
    from mmvae.retrieval.index import search as search_module
    seen, orig = [], search_module.search
    monkeypatch.setattr(search_module, "search", lambda ix, *a, **k: seen.append(k["rerank_factor"]) or orig(ix, *a, **k))
    wide.search(q, 10)
    pq.search(q, 10)
    wide.search(q, 10, rerank_factor=2)
    assert seen == [16, 4, 2]
    assert choose_kind(10 ** 4, 200, 2.0) == "flat" and choose_kind(10 ** 6, 200, 2.0) == "ivf"
    assert choose_kind(5000, 200, 1e-6) == "flat"          # too few cases for PQ codebooks, whatever the budget
    assert choose_kind(10 ** 6, 200, 0.5) == "opq-ivfpq" and choose_kind(10 ** 7, 200, 64) == "opq-ivfpq"


_RSS_SCRIPT = r"""
import json, sys
from mmvae.retrieval.shards import ShardSet
from mmvae.retrieval.index.stream import build_from_shards

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

out = {}
for name in sys.argv[1:]:
    ss = ShardSet(name)
    ss.shard(0).vectors_with(None)                      # imports and first-shard buffers warm
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:       # reset the peak (VmHWM) to the current RSS
        f.write("5")
    build_from_shards(ss, name + "-ix", kind="ivfpq", nlist=32, m_pq=8, train_size=10000, show_progress=False)
    out[len(ss)] = (status("VmHWM") - base) * 1024
print(json.dumps(out))
"""


def test_streaming_build_memory_does_not_grow_with_the_cases(tmp_path):
    rng = np.random.default_rng(1)
    per, sizes = 5_000, (4, 16)
    sets = [S.write_shard_set((_synthetic_part(i, per, rng) for i in range(k)), tmp_path / f"set{k}") for k in sizes]
    # glibc's dynamic mmap threshold would keep freed shard buffers in the heap (noise of tens of MB)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, *(str(x.folder) for x in sets)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    grew = {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}
    small, large = grew[sizes[0] * per], grew[sizes[1] * per]
    extra = (sizes[1] - sizes[0]) * per * 40 * 4 * 4        # means, log-variances, experts' means and log-variances
    print(f"peak RSS growth of the streaming build: {small / 1e6:.1f} MB for {sizes[0] * per} cases, "
          f"{large / 1e6:.1f} MB for {sizes[1] * per} (the extra cases' floats: {extra / 1e6:.0f} MB)")
    assert large - small < 0.15 * extra
    ix = load_index(str(sets[1].folder) + "-ix")
    assert len(ix) == sizes[1] * per and ix.kind == "ivfpq"
