"""``python -m tusk`` is the ``tusk`` command."""

import sys

from tusk.cli import main

sys.exit(main())
