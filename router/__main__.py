import sys

from tusk.router.app import main

sys.exit(main())
