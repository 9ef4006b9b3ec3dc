"""``python -m mmvae.cli ...``: the ``mmvae`` command."""
import sys

from mmvae.cli import main

if __name__ == "__main__":
    sys.exit(main())
