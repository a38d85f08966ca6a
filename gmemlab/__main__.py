"""``python -m gmemlab``: the same as the ``gmemlab`` command."""

import sys

from gmemlab.cli import main

sys.exit(main())
