"""``python -m mocolab.exercises FILE.py``: every checker against the functions of the same names in FILE.py."""
from __future__ import annotations

import sys

from . import main

sys.exit(main())
