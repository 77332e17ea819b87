"""qomfs: a running QEMU's object model (QOM) as an ordinary filesystem."""

__version__ = "0.1.0"
