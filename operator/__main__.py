"""``python -m tusk.operator``: the same as ``tusk operator``."""

import sys

from tusk.operator.main import main

sys.exit(main())
