"""
C{filecache-client}: list a filecache daemon's folder, download files with a
progress bar, show its figures.  Exceptions become exit statuses here only.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import signal
import sys
from collections.abc import MutableMapping, Sequence
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

from filecache import __version__, wire
from filecache.client.download import LocalError, Progress, Session, destination, fetch, part_names
from filecache.client.protocol import (
    BrokenReply,
    ConnectionLostEarly,
    FileCacheClientProtocol,
    ServerError,
)

EXIT_OK = 0
EXIT_SERVER_ERROR = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3
EXIT_INTEGRITY = 4
EXIT_LOCAL = 5
EXIT_BROKEN_PIPE = 141
"""stdout was closed before all output was written (C{list | head -1}):
what a shell reports for a tool that SIGPIPE ended; nothing is printed."""
EXIT_SIGNAL_BASE = 128
"""Stopped by a signal: 128 + its number, as a shell reports it (130 for
SIGINT, 143 for SIGTERM)."""

COMMANDS = ("list", "get", "stats")

_EPILOG = """\
commands:
  list                 the shared files (--cached: only those in the cache)
  get NAME [NAME ...]  download files into -o DIR (default .), sub-folders kept
  stats                the server's figures
  NAME [DIR]           download one file into DIR (use `get` for a file
                       named list, get or stats)

exit status:
  0 success                    3 cannot connect, connection lost or timed out
  1 the server answered ERR    4 integrity check failed (size or SHA-256)
  2 usage error                5 local error (destination exists, cannot write)
  130 interrupted (Ctrl-C, SIGINT), 143 terminated (SIGTERM): partial
      downloads are kept, and the same get resumes them
  141 stdout was closed before all output was written (`list | head -1`)
"""


def say(err: IO[str], text: str) -> None:
    """
    One line on stderr.  Everything said goes through wire.printable, since
    most of it can hold what a server sent (ERR texts, TLS errors) or a name
    that may hold control characters; messages quote names with '...', not
    repr(), so nothing is escaped twice.
    """
    err.write(f"filecache-client: {wire.printable(text)}\n")


def write_json(data: object, out: IO[str]) -> None:
    """
    C{data} as indented JSON on C{out}, with every character that is not
    printable (DEL, C1 controls such as U+009B, which json leaves raw) as a
    \\u escape: still the same JSON value, and safe on a terminal.  Written
    in the encoder's small pieces: one huge write to a pipe whose reader
    has gone can end in a short write that Python does not report.
    """
    for piece in json.JSONEncoder(indent=1, ensure_ascii=False).iterencode(data):
        if not piece.replace("\n", "").isprintable():
            piece = "".join(
                ch if ch.isprintable() or ch == "\n" else "".join(
                    f"\\u{unit:04x}" for unit in _utf16_units(ch)
                )
                for ch in piece
            )
        out.write(piece)
    out.write("\n")


def _utf16_units(ch: str) -> list[int]:
    raw = ch.encode("utf-16-be", "surrogatepass")
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


class UsageError(Exception):
    """A command line that cannot be run."""


class Interrupted(Exception):
    """
    A signal stopped the client before it was done.

    @ivar unfinished: lines saying what was left undone, for stderr.
    """

    def __init__(self, signum: int, unfinished: Sequence[str] = ()) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.unfinished = list(unfinished)


class Stop:
    """
    Whether a signal asked the client to stop, and the work it stops: the
    first SIGINT or SIGTERM cancels what the work is waiting on (no retry
    follows, partial files are kept); a second one ends the process at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._work: Deferred[Any] | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def watch(self, work: Deferred[Any]) -> None:
        self._work = work

    def request(self, signum: int) -> None:
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        if self._work is not None and not self._work.called:
            self._work.cancel()


def human_size(size: int) -> str:
    """C{1536} -> C{1.5 KiB}."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="filecache-client",
        description="Talk to a filecache daemon.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("host", help="the daemon's host name or address")
    parser.add_argument("port", help="the daemon's TCP port")
    parser.add_argument("words", nargs="+", metavar="COMMAND", help="see below")
    parser.add_argument("-o", "--output", metavar="DIR", help="where `get` saves files")
    parser.add_argument("--cached", action="store_true", help="list: only cached files")
    parser.add_argument("--json", action="store_true", help="list, stats: print JSON")
    parser.add_argument("--force", action="store_true", help="get: overwrite existing files")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="give up on connecting, on a server silent this long, or on a "
        "reply that brings under 16 KiB in this long (default 30; 0 waits forever)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        metavar="N",
        help="get: when the connection is lost, reconnect and resume up to N "
        "times per file, with backoff (default 3)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS, verifying the server's certificate against the "
        "system's trusted CAs (or --cafile)",
    )
    parser.add_argument("--cafile", metavar="FILE", help="with --tls: trust the CA certificates in FILE (PEM)")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="with --tls: do not verify the certificate (anyone in the path can read and change the data)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


class Invocation:
    """A parsed command line."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.host: str = args.host
        try:
            self.port = int(args.port)
        except ValueError:
            raise UsageError(f"port must be a number, not '{args.port}'") from None
        if not 0 < self.port < 65536:
            raise UsageError(f"port out of range: {self.port}")
        words: list[str] = args.words
        self.command = words[0] if words[0] in COMMANDS else "get"
        self.names: list[str] = []
        self.folder: str = args.output or "."
        if words[0] in ("list", "stats"):
            if len(words) > 1:
                raise UsageError(f"{words[0]} takes no names")
        elif words[0] == "get":
            self.names = words[1:]
            if not self.names:
                raise UsageError("get needs at least one NAME")
        else:
            # The seed form: NAME [DIR].
            if len(words) > 2:
                raise UsageError("expected NAME [DIR]; use `get` for several files")
            self.names = [words[0]]
            if len(words) == 2:
                if args.output:
                    raise UsageError("give DIR or -o DIR, not both")
                self.folder = words[1]
        self.cached: bool = args.cached
        self.json: bool = args.json
        self.force: bool = args.force
        self.quiet: bool = args.quiet
        self.timeout: float | None = args.timeout or None
        if args.timeout < 0:
            raise UsageError("--timeout must not be negative")
        self.retries: int = args.retries
        if self.retries < 0:
            raise UsageError("--retries must not be negative")
        self.tls: bool = args.tls or bool(args.cafile) or args.insecure
        self.cafile: str | None = args.cafile
        self.insecure: bool = args.insecure
        if self.insecure and self.cafile:
            raise UsageError("give --cafile or --insecure, not both")


BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {done}/{size} [{elapsed}<{remaining}, {speed}]"
"""The progress bar: sizes and rate in the binary units `list` uses (KiB, MiB)."""


@functools.cache
def _bar_class() -> Any:
    # tqdm is imported only when a bar is shown.
    from tqdm import tqdm

    class BinaryBar(tqdm):  # type: ignore[type-arg]
        """A tqdm bar whose figures are human_size()s: 1 KiB is 1024 bytes, and says so."""

        @property
        def format_dict(self) -> MutableMapping[str, Any]:
            figures = super().format_dict
            rate = figures["rate"]
            elapsed = figures["elapsed"]
            if rate is None and elapsed:
                rate = (figures["n"] - figures["initial"]) / elapsed
            figures["done"] = human_size(int(figures["n"]))
            total = figures["total"]
            figures["size"] = "?" if total is None else human_size(int(total))
            figures["speed"] = "?" if rate is None else human_size(int(rate)) + "/s"
            return figures

    return BinaryBar


class TqdmProgress(Progress):
    """A tqdm bar per file on stderr."""

    def __init__(self, stream: IO[str], enabled: bool) -> None:
        self._stream = stream
        self._enabled = enabled
        self._bar: Any = None

    def start(self, name: str, total: int, done: int) -> None:
        if not self._enabled:
            return
        self._bar = _bar_class()(
            total=total,
            initial=done,
            desc=wire.printable(name),
            unit="B",
            bar_format=BAR_FORMAT,
            file=self._stream,
            leave=True,
            dynamic_ncols=True,
        )

    def advance(self, count: int) -> None:
        if self._bar is not None:
            self._bar.update(count)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def tls_creator(inv: Invocation, err: IO[str]) -> Any:
    """The TLS client settings for C{inv}: verified, against C{--cafile}, or not at all."""
    try:
        from twisted.internet import ssl
    except ImportError:  # pragma: no cover - depends on the install
        raise UsageError("--tls needs the TLS extra: pip install 'filecache[tls]'") from None
    if inv.insecure:
        say(err, "warning: --insecure: the server's certificate is not checked")
        return _UnverifiedTLS(inv.host)
    if inv.cafile:
        try:
            with open(inv.cafile, "rb") as f:
                trust: Any = ssl.Certificate.loadPEM(f.read())
        except OSError as e:
            raise UsageError(f"--cafile {inv.cafile}: {e.strerror}") from None
        except Exception as e:  # noqa: BLE001 - pyOpenSSL raises several kinds for bad PEM
            raise UsageError(f"--cafile {inv.cafile}: not a PEM certificate ({e})") from None
    else:
        trust = ssl.platformTrust()
    return ssl.optionsForClientTLS(inv.host, trustRoot=trust)


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedTLS:
    """TLS with no certificate check at all (--insecure); SNI still sent."""

    def __init__(self, host: str) -> None:
        from twisted.internet import ssl

        self._host = host
        self._context = ssl.CertificateOptions(verify=False).getContext()

    def clientConnectionForTLS(self, tls_protocol: Any) -> Any:
        from OpenSSL import SSL

        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tls_protocol)
        try:
            connection.set_tlsext_host_name(self._host.encode("idna"))
        except (UnicodeError, ValueError):
            pass
        return connection


async def connect(reactor: Any, inv: Invocation, err: IO[str]) -> FileCacheClientProtocol:
    from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS

    endpoint: Any = HostnameEndpoint(reactor, inv.host, inv.port, timeout=inv.timeout or 30)
    if inv.tls:
        endpoint = wrapClientTLS(tls_creator(inv, err), endpoint)
    protocol = FileCacheClientProtocol(timeout=inv.timeout)
    await connectProtocol(endpoint, protocol)
    return protocol


def print_listing(rows: Sequence[wire.ListRow], as_json: bool, out: IO[str]) -> None:
    """The listing, sorted by path (by its UTF-8 bytes, as the daemon once did)."""
    rows = sorted(rows, key=lambda r: r.path.encode("utf-8"))
    if as_json:
        data = [
            {"path": r.path, "size": r.size, "mtime": r.mtime, "cached": r.cached}
            for r in rows
        ]
        write_json(data, out)
        return
    sizes = [human_size(r.size) for r in rows]
    width = max([len(s) for s in sizes] + [4])
    out.write(f"{'SIZE':>{width}}  C  NAME\n")
    for row, size in zip(rows, sizes):
        out.write(f"{size:>{width}}  {'C' if row.cached else '-'}  {wire.printable(row.path)}\n")
    total = sum(r.size for r in rows)
    cached = sum(1 for r in rows if r.cached)
    out.write(f"{len(rows)} files, {human_size(total)}, {cached} cached\n")


def print_stats(stats: Sequence[tuple[str, wire.StatValue]], as_json: bool, out: IO[str]) -> None:
    if as_json:
        write_json(dict(stats), out)
        return
    shown = [(wire.printable(key), wire.printable(str(value))) for key, value in stats]
    width = max([len(k) for k, _ in shown] + [1])
    for key, value in shown:
        out.write(f"{key:<{width}}  {value}\n")


async def run(
    reactor: Any, inv: Invocation, out: IO[str], err: IO[str], stop: Stop | None = None
) -> int:
    """Carry out C{inv}; return the exit status.  Errors propagate."""
    if inv.command != "get":
        client = await connect(reactor, inv, err)
        try:
            if inv.command == "list":
                print_listing(await client.list(inv.cached), inv.json, out)
            else:
                print_stats(await client.stats(), inv.json, out)
        finally:
            await client.quit()
        return EXIT_OK
    session = Session(lambda: connect(reactor, inv, err))
    try:
        return await get_all(session, inv, out, err, reactor, stop or Stop())
    finally:
        await session.close()


async def get_all(
    session: Session, inv: Invocation, out: IO[str], err: IO[str], reactor: Any, stop: Stop
) -> int:
    """
    Fetch every name; a per-file error is reported and the rest go on.

    @raise Interrupted: once C{stop} is requested, saying what is unfinished.
    """
    from twisted.internet.task import deferLater

    status = EXIT_OK
    show_bar = not inv.quiet and err.isatty()

    def retrying(name: str, error: BaseException, delay: float) -> None:
        say(err, f"{name}: {describe(error)}; retrying in {delay:g} s")

    for index, name in enumerate(inv.names):
        try:
            if stop.signum is not None:
                raise Interrupted(stop.signum)
            saved, _result = await fetch(
                session,
                name,
                inv.folder,
                force=inv.force,
                progress=lambda: TqdmProgress(err, show_bar),
                retries=inv.retries,
                sleep=lambda seconds: deferLater(reactor, seconds),
                on_retry=retrying,
                interrupted=lambda: stop.requested,
            )
        except BaseException as e:
            if stop.signum is not None:
                raise Interrupted(stop.signum, unfinished(inv, index)) from None
            if not isinstance(e, (ServerError, LocalError, BrokenReply, ConnectionLostEarly, ConnectError)):
                raise
            say(err, f"{name}: {describe(e)}")
            status = status or exit_status(e)
            if isinstance(e, (ConnectionLostEarly, ConnectError)):
                # Retries are spent: the server is out of reach for the rest too.
                return status
            continue
        out.write(f"{wire.printable(saved)}\n")
    return status


def unfinished(inv: Invocation, index: int) -> list[str]:
    """What is left undone when C{inv.names[index]} was being fetched."""
    name = inv.names[index]
    lines = [f"{name}: not finished"]
    try:
        part, _ = part_names(destination(inv.folder, name))
    except LocalError:
        part = ""
    if part and os.path.isfile(part):
        lines[0] += f"; {part} is kept: the same get resumes it"
    rest = inv.names[index + 1 :]
    if rest:
        lines.append(f"not started ({len(rest)}): {shlex.join(rest)}")
    return lines


def report(error: BaseException, err: IO[str]) -> None:
    """Say on C{err} why the client stops (nothing when stdout was closed: the reader left)."""
    if isinstance(error, BrokenPipeError):
        return
    say(err, describe(error))
    if isinstance(error, Interrupted):
        for line in error.unfinished:
            say(err, line)


def describe(error: BaseException) -> str:
    if isinstance(error, ServerError):
        text = {"not-found": "not found on the server"}.get(error.code)
        return text or f"server error {error.code}: {error.message}"
    if isinstance(error, BrokenReply):
        return f"integrity check failed: {error}"
    if isinstance(error, DNSLookupError):
        return "cannot resolve the host name"
    if isinstance(error, ConnectError):
        return f"cannot connect: {error}".rstrip(".")
    return str(error) or type(error).__name__


def exit_status(error: BaseException) -> int:
    """The one place that maps an exception to an exit status."""
    if isinstance(error, ServerError):
        return EXIT_SERVER_ERROR
    if isinstance(error, UsageError):
        return EXIT_USAGE
    if isinstance(error, (ConnectError, ConnectionLostEarly, DNSLookupError)):
        return EXIT_CONNECTION
    if isinstance(error, BrokenReply):
        return EXIT_INTEGRITY
    if isinstance(error, LocalError):
        return EXIT_LOCAL
    if isinstance(error, Interrupted):
        return EXIT_SIGNAL_BASE + error.signum
    if isinstance(error, BrokenPipeError):
        return EXIT_BROKEN_PIPE
    return EXIT_CONNECTION


def drive(reactor: Any, inv: Invocation, out: IO[str], err: IO[str]) -> int:
    """
    Run C{inv} on C{reactor} until it is done or a signal stops it; return
    the exit status.  SIGINT and SIGTERM are ours, not the reactor's: its
    own handlers would stop the reactor under a download, which then looked
    like a lost connection, was "retried" and exited 0.
    """
    stop = Stop()
    outcome: list[int] = []

    def finished(result: object) -> None:
        if isinstance(result, Failure):
            error = result.value
            assert error is not None  # a Failure always holds its exception
            if stop.signum is not None and not isinstance(error, Interrupted):
                error = Interrupted(stop.signum)
            report(error, err)
            outcome.append(exit_status(error))
        else:
            assert isinstance(result, int)
            outcome.append(result)
        reactor.stop()

    def start() -> None:
        work = Deferred.fromCoroutine(run(reactor, inv, out, err, stop))
        stop.watch(work)
        work.addBoth(finished)

    def on_signal(signum: int, frame: object) -> None:
        # Python runs this between two bytecodes of whatever the reactor is
        # doing: hand the request to the reactor's own loop.
        reactor.callFromThread(stop.request, signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        reactor.callWhenRunning(start)
        reactor.run(installSignalHandlers=False)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return outcome[0] if outcome else EXIT_CONNECTION


def main(argv: Sequence[str] | None = None) -> None:
    """The console script."""
    try:
        _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C before drive() took SIGINT over (while starting up).
        say(sys.stderr, "interrupted by SIGINT")
        raise SystemExit(EXIT_SIGNAL_BASE + signal.SIGINT) from None


def _main(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_intermixed_args(argv)
    try:
        inv = Invocation(args)
    except UsageError as e:
        say(sys.stderr, str(e))
        raise SystemExit(EXIT_USAGE) from None

    from twisted.internet import reactor

    status = drive(reactor, inv, sys.stdout, sys.stderr)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        status = status or EXIT_BROKEN_PIPE
    if status == EXIT_BROKEN_PIPE:
        # What is still buffered cannot be written; without this, Python's
        # flush at exit would print "Exception ignored ... Broken pipe".
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    if status:
        raise SystemExit(status)
