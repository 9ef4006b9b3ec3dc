"""Progress bars (tqdm) that stay quiet when disabled or not on a terminal in CI."""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(it: Iterable[T], *, total: int | None = None, desc: str = "", enable: bool = True,
                 unit: str = "it") -> Iterable[T]:
    """Wrap ``it`` in a tqdm bar with ETA; disabled when ``enable`` is False or in CI without a tty."""
    disable = (not enable) or (os.environ.get("CI") == "true" and not sys.stderr.isatty())
    return tqdm(it, total=total, desc=desc, disable=disable, unit=unit, dynamic_ncols=True, leave=False)
