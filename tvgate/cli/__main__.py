"""``python -m tvgate.cli``: the ``tvgate`` command, as the tests and ``make`` run it."""

import sys

from tvgate.cli import main

sys.exit(main())
