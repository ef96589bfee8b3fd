"""The project's one logger.

Every module logs through ``logger`` (progress at INFO, things a user must know at WARNING). The
command lines attach a handler that prints both to stderr; a program that imports ``lean`` as a
library sees only what its own logging set-up lets through.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("lean")
