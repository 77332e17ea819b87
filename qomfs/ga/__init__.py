"""The host side of the QEMU guest agent: a client for qemu-ga and the ``qemu-ga-client`` tool."""

from qomfs.ga.client import (
    AgentClient,
    AgentClosed,
    AgentCommandError,
    AgentConnectError,
    AgentError,
    AgentProtocolError,
    AgentTimeout,
)

__all__ = [
    "AgentClient",
    "AgentClosed",
    "AgentCommandError",
    "AgentConnectError",
    "AgentError",
    "AgentProtocolError",
    "AgentTimeout",
]
