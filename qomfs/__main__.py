"""``python -m qomfs`` runs the ``qom-fuse`` command."""

import sys

from qomfs.cli import main

sys.exit(main())
