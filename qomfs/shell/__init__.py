"""qmp-shell and qmp-shell-wrap: QEMU's QMP shell on qomfs's client.

:mod:`~qomfs.shell.parse` (the input syntax) and :mod:`~qomfs.shell.schema`
(``query-qmp-schema``) are shared with the one-shot ``qmp`` command.
"""

from qomfs.shell.main import main
from qomfs.shell.wrap import wrap_main

__all__ = ["main", "wrap_main"]
