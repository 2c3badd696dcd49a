"""``python -m tusk.worker --config-json '<WorkerConfig JSON>'`` (or ``--config FILE``)."""

import sys

from tusk.worker.server import main

if __name__ == "__main__":
    sys.exit(main())
