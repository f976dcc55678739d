"""``python -m connbudget``: the same as the ``connbudget`` command."""

import sys

from connbudget.cli import main

sys.exit(main())
