"""Logging for the scalepub commands and shard processes."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def configure_logging(level: str, who: str = "") -> None:
    """One format for the supervisor and every shard process; ``who`` (a supervisor's id)
    starts each line, so the logs of several supervisors can be told apart."""
    prefix = who.replace("%", "%%") + " " if who else ""
    logging.basicConfig(level=level, format=LOG_FORMAT.replace("%(levelname)s ",
                                                               f"%(levelname)s {prefix}", 1))
    if level != "DEBUG":  # slixmpp narrates every login at INFO
        logging.getLogger("slixmpp").setLevel(logging.WARNING)
