"""The demo from a checkout: ``python scripts/demo.py``.

The demo itself is in the package (``geventproxy demo`` once installed).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geventproxy.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
