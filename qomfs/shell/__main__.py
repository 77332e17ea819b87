"""``python -m qomfs.shell``: qmp-shell."""

import sys

from qomfs.shell.main import main

sys.exit(main())
