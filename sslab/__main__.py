"""``python -m sslab ...``: the same as the ``sslab`` command."""

import sys

from sslab.cli import main

sys.exit(main())
