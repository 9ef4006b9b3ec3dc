"""What several commands share: the config they start from and the ``--on-error`` option."""
from __future__ import annotations

ON_ERROR_HELP = "bad cases: stop (default) or skip with a warning"
CONFIG_HELP = ("config file[:args] or a shipped config by name (quickstart, brats, medpix, ...), "
               "default quickstart")


def load(spec: str | None, overrides: list[str], default: str = "quickstart.py"):
    """The config ``spec`` (default ``default``) with the ``--config.a.b=value`` overrides."""
    from mmvae.config import load_config
    if spec is None:
        spec = default
    return load_config(spec, overrides)


def on_error(config, a):
    """``config`` with ``--on-error`` (when given) as ``data.on_error``."""
    if getattr(a, "on_error", None):
        with config.unlocked():
            config.data.on_error = a.on_error
    return config
