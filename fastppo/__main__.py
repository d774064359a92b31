"""``python -m fastppo ...``: the same command line as ``fastppo ...`` (see :mod:`fastppo.cli`)."""

import sys

from fastppo.cli import main

sys.exit(main())
