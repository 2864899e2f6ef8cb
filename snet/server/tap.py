"""``twistd snet-server``: the monolith. Not built yet: it says so and exits with an error."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage


class Options(usage.Options):
    """No options yet: the monolith is the next issue."""


def makeService(options: Options) -> IService:
    raise SystemExit("snet-server: the monolith is not built yet; run snet-chat instances for now")
