"""``python -m tusk.router.sim`` runs ``tusk sim``."""

import sys

from tusk.router.sim.cli import main

sys.exit(main())
