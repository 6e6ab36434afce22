"""``python -m tvgate``: the ``tvgate`` command without the console script."""

import sys

from tvgate.cli import main

sys.exit(main())
