"""
The command line of C{filecache-client}: the argparse parser and
Invocation, which checks a parsed command line and holds what it asks.
"""

from __future__ import annotations

import argparse

from filecache import __version__
from filecache.client.errors import UsageError

COMMANDS = ("list", "get", "stats")
PROGRESS = ("auto", "bars", "plain", "none")

DEFAULT_PARALLEL = 4
"""Connections a get uses by default (docs/client.md says how it was chosen)."""
MAX_PARALLEL = 32
"""Half the daemon's default --max-per-ip: room is left for other clients on this host."""

_EPILOG = """\
commands:
  list [NAME ...]      the shared files (--cached: only those in the cache),
                       or those the NAMEs match, as `get` would fetch them
  get NAME [NAME ...]  download files into -o DIR (default .), sub-folders kept;
                       a NAME is a file, a folder (docs/, or -r docs) or a
                       shell pattern ('logs/*.txt', '**/*.bin'); files already
                       there with the server's SHA-256 are skipped; -o - writes
                       one file to stdout
  stats                the server's figures
  NAME [DIR]           download NAME into DIR (use `get` for a file
                       named list, get or stats)

exit status:
  0 success                    3 cannot connect, connection lost or timed out
  1 the server answered ERR    4 integrity check failed (size or SHA-256)
  2 usage error                5 local error (a local file differs: --force; cannot write)
  130 interrupted (Ctrl-C, SIGINT), 143 terminated (SIGTERM): partial
      downloads are kept, and the same get resumes them
  141 stdout was closed before all output was written (`list | head -1`)
"""


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
    parser.add_argument("--force", action="store_true", help="get: overwrite local files that differ")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary, only errors")
    parser.add_argument(
        "-r", "--recursive", action="store_true", help="get, list: a NAME that is a folder means its tree"
    )
    parser.add_argument(
        "-j",
        "--parallel",
        type=int,
        default=DEFAULT_PARALLEL,
        metavar="N",
        help=f"get: up to N connections at once (default {DEFAULT_PARALLEL}, at most {MAX_PARALLEL})",
    )
    parser.add_argument(
        "--delete",
        action="store_true",
        help="get: remove local files under what the NAMEs cover that the server no longer has",
    )
    parser.add_argument(
        "-n", "--dry-run", action="store_true", help="get: print what would change, change nothing"
    )
    parser.add_argument(
        "--progress",
        choices=PROGRESS,
        default="auto",
        help="get: bars (auto: only on a terminal), plain (a line per file, for logs) or none",
    )
    parser.add_argument(
        "--print",
        dest="print_names",
        action="store_true",
        help="get: print saved names on stdout even when it is the terminal the bars are on",
    )
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
        self.seed = words[0] not in COMMANDS
        """The seed form, C{NAME [DIR]}: its NAME may be a mistyped command."""
        self.names: list[str] = []
        self.folder: str = args.output or "."
        if words[0] == "stats":
            if len(words) > 1:
                raise UsageError("stats takes no names")
        elif words[0] == "list":
            self.names = words[1:]
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
        self.recursive: bool = args.recursive
        self.parallel: int = args.parallel
        if not 1 <= self.parallel <= MAX_PARALLEL:
            raise UsageError(f"--parallel must be 1 to {MAX_PARALLEL}")
        self.delete: bool = args.delete
        self.dry_run: bool = args.dry_run
        self.progress: str = args.progress
        self.print_names: bool = args.print_names
        if self.command != "get" and (self.delete or self.dry_run):
            raise UsageError("--delete and --dry-run go with get")
        self.to_stdout = self.command == "get" and self.folder == "-"
        """C{-o -}: one file's bytes to stdout."""
        if self.to_stdout and (len(self.names) > 1 or self.delete or self.dry_run):
            raise UsageError("-o - writes one file to stdout: one NAME, no --delete or --dry-run")
        self.tls: bool = args.tls or bool(args.cafile) or args.insecure
        self.cafile: str | None = args.cafile
        self.insecure: bool = args.insecure
        if self.insecure and self.cafile:
            raise UsageError("give --cafile or --insecure, not both")
