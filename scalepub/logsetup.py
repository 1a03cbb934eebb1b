"""Logging for the scalepub commands and shard processes."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """One format for the supervisor and every shard process."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    if level != "DEBUG":  # slixmpp narrates every login at INFO
        logging.getLogger("slixmpp").setLevel(logging.WARNING)
