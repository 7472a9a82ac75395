"""``python -m mocolab …`` (also under ``torchrun -m mocolab pretrain …``)."""
from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
