"""
How a request outlives a lost connection: the doubling delay, and Retrying,
which says whether one more attempt is due and waits for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from filecache.client.errors import ConnectionLostEarly, HandshakeFailed, VersionChanged

RETRYABLE = (ConnectionLostEarly, ConnectError, VersionChanged)

FIRST_DELAY = 0.25
MAX_DELAY = 5.0


def retry_delay(attempt: int) -> float:
    """
    Seconds to wait before retry number C{attempt} (1, 2, ...): 0.25,
    doubling, at most 5.  No jitter: one client retrying one file has no
    herd to spread, and the delay it announces is the delay it waits.
    (Twisted's backoffPolicy computes the same, but importing its module
    added about 20 ms to every start of the client.)
    """
    return min(FIRST_DELAY * 2.0 ** min(attempt - 1, 64), MAX_DELAY)


def _say_nothing(name: str, error: BaseException, delay: float) -> None:
    pass


def _never() -> bool:
    return False


@dataclass(frozen=True)
class Retrying:
    """
    Up to C{retries} retries, each after L{retry_delay} on C{clock} and
    announced to C{on_retry(name, error, delay)}; none once
    C{interrupted()} is true, and none after a refused TLS handshake.
    """

    clock: IReactorTime
    retries: int = 0
    on_retry: Callable[[str, BaseException, float], None] = _say_nothing
    interrupted: Callable[[], bool] = _never

    def allows(self, error: BaseException, attempt: int) -> bool:
        """Whether retry number C{attempt} may follow C{error}."""
        return attempt <= self.retries and not isinstance(error, HandshakeFailed) and not self.interrupted()

    async def wait(self, error: BaseException, attempt: int, name: str) -> None:
        """Wait before retry number C{attempt} of C{name}, or raise C{error} if none is left."""
        if not self.allows(error, attempt):
            raise error
        delay = retry_delay(attempt)
        self.on_retry(name, error, delay)
        await deferLater(self.clock, delay)
