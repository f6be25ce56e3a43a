"""
The HTTP side (docs/http.md) under attack, against a real twistd: every
hostile path of the native suite replayed over HTTP (404, nothing leaks),
request smuggling, malformed heads, limits, and a slow-header flood while
another client keeps being served.  Every response is parsed by h11.
"""

from __future__ import annotations

import os
import resource
import selectors
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, DaemonFactory, RawClient, start_daemon, stats, wait_for
from httpkit import HttpConnection, Response, request_bytes, write_pattern

pytestmark = pytest.mark.system

SECRET = b"TOP-SECRET-7f3a9c-outside-the-share"
HIDDEN = b"HIDDEN-MARKER-d41d8c"
GIT = b"[core] GIT-MARKER-0e9b"
SMALL = b"small and shared\n"
SMUGGLED = b"SMUGGLED-ANSWER-5c1e\n"

# What no answer to a hostile request may carry, in its head or its body.
MARKERS = [SECRET, HIDDEN, GIT, b"root:x:0:0", b"SMUGGLED-ANSWER"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """
    A shared folder with every way out the native suite tries (symlinks
    out, to dotfiles, to devices and /etc, a FIFO, a socket, dot-folders)
    and a secret file beside it whose content must never be served.
    """
    top = tmp_path_factory.mktemp("http-hostile")
    share = top / "share"
    outside = top / "outside"
    for folder in (share / "sub", share / ".git", outside):
        folder.mkdir(parents=True)
    (outside / "secret.txt").write_bytes(SECRET)
    (share / "small.txt").write_bytes(SMALL)
    (share / "sub" / "inner.txt").write_bytes(b"inner\n")
    (share / "smuggled.txt").write_bytes(SMUGGLED)
    (share / ".hidden").write_bytes(HIDDEN)
    (share / "sub" / ".hidden").write_bytes(HIDDEN)
    (share / ".git" / "config").write_bytes(GIT)
    (share / ".git" / "HEAD").write_bytes(GIT)
    links = {
        "link_out": "../outside/secret.txt",
        "dir_out": "../outside",
        "abs_link": str(outside / "secret.txt"),
        "link_hidden": ".hidden",
        "link_git": ".git/config",
        "link_in": "small.txt",
        "link_sub": "sub",
        "sub/escape": "../../outside",
        "dev_zero": "/dev/zero",
        "dev_null": "/dev/null",
        "etc_link": "/etc",
        "passwd_link": "/etc/passwd",
        "loop": "loop",
        "dangling": "nowhere/at/all",
    }
    for name, target in links.items():
        os.symlink(target, share / name)
    os.mkfifo(share / "fifo")
    try:
        os.mknod(share / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(share / "sock"))
    listener.close()
    return share


@pytest.fixture(scope="module")
def hostile_daemon(site: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon serving C{site} for the whole module (its tests only read)."""
    daemon = start_daemon(site, tmp_path_factory.mktemp("http-hostile-log") / "daemon.log")
    yield daemon
    daemon.stop()


def assert_no_leak(response: Response, site: Path) -> None:
    """Neither head nor body carries a secret, a dotfile's bytes, or where the share lives."""
    head = "\n".join(f"{k}: {v}" for k, v in response.headers).encode("latin-1")
    for marker in MARKERS:
        assert marker not in response.body and marker not in head, f"leaked {marker!r}: {response}"
    for place in (str(site.parent), str(Path(os.path.realpath(site.parent)))):
        assert place.encode() not in response.body + head, f"leaked the path {place}: {response}"


def assert_error_body(response: Response) -> None:
    """An error body is one short line of text (docs/http.md)."""
    assert response["content-type"] == "text/plain; charset=utf-8", response
    assert len(response.body) < 200 and response.body.rstrip(b"\n").count(b"\n") == 0, response


# Hostile paths

# test_protocol.HOSTILE_PATHS, each as an origin-form target ("sub" is left
# out: over HTTP a shared folder without its slash is a 301), then what the
# HTTP side adds: dot-folders, devices, /etc, links out of sub-folders, the
# absolute form, and more spellings of the same escapes.
NATIVE_HOSTILE = [
    "nope.txt", "../outside/secret.txt", "%2e%2e/outside/secret.txt",
    "%2E%2E%2Foutside%2Fsecret.txt", "sub/../../outside/secret.txt", "sub/../small.txt",
    "./small.txt", "/etc/passwd", "%2Fetc%2Fpasswd", ".hidden", "sub/.hidden", ".git/config",
    "link_out", "dir_out/secret.txt", "link_hidden", "fifo", "small.txt%00", "sub%5Cinner.txt",
    "sub//inner.txt", "small.txt/",
]  # fmt: skip
HOSTILE_TARGETS = [
    *("/" + path for path in NATIVE_HOSTILE),
    "/..%2foutside%2fsecret.txt",
    "/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/sub/%2e%2e/%2e%2e/outside/secret.txt",
    "/sub/%2E%2e/small.txt",
    "/sub/./inner.txt",
    "/%2e/small.txt",
    "/%252e%252e/outside/secret.txt",
    "/sub%5c..%5c..%5coutside%5csecret.txt",
    "/sub/..%5c..%5coutside%5csecret.txt",
    "/etc/passwd",
    "/proc/self/environ",
    "//small.txt",
    "/sub/inner.txt/",
    "/sub/inner.txt/.",
    "/sub/inner.txt/..",
    "/.git",
    "/.git/",
    "/.git/HEAD",
    "/%2egit/config",
    "/.%67it/config",
    "/.hidden/",
    "/link_git",
    "/dir_out",
    "/dir_out/",
    "/dir_out/secret.txt/",
    "/sub/escape",
    "/sub/escape/",
    "/sub/escape/secret.txt",
    "/link_sub/escape/secret.txt",
    "/abs_link",
    "/dev_zero",
    "/dev_null",
    "/null",
    "/sock",
    "/etc_link",
    "/etc_link/",
    "/etc_link/passwd",
    "/passwd_link",
    "/loop",
    "/dangling",
    "/small.txt%00.jpg",
    "/%00",
    "/sub%00/inner.txt",
    "/small.txt%0a",
    "/small.txt%0d%0aX-Injected:%20yes",
    "http://127.0.0.1/../outside/secret.txt",
    "http://127.0.0.1/%2e%2e/outside/secret.txt",
    "http://127.0.0.1/.git/config",
    "http://evil.example/etc/passwd",
    "http://127.0.0.1:1/dir_out/secret.txt",
]

# Targets a strict server may refuse as malformed (400) instead of 404:
# bytes a URI cannot hold, and escapes that do not decode to UTF-8.
MALFORMED_TARGETS = [
    "/sub\\inner.txt",
    "/..\\outside\\secret.txt",
    "/%c0%ae%c0%ae/outside/secret.txt",
    "/%c0%afetc%c0%afpasswd",
    "/%ff%fe",
    "/\u00fc",
    "/small.txt\x7f",
]


def test_the_native_hostile_paths_are_all_replayed() -> None:
    """Every path of the native suite's hostile list is replayed here (the list is copied, not imported, at collection)."""
    from test_protocol import HOSTILE_PATHS

    assert {p.decode() for p in HOSTILE_PATHS} - {"sub"} == set(NATIVE_HOSTILE)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("target", HOSTILE_TARGETS)
def test_hostile_paths_are_404_and_leak_nothing(
    hostile_daemon: Daemon, site: Path, target: str, method: str
) -> None:
    """
    A hostile or refused target is `404 Not Found` (never 403 or 301, so
    nothing about what exists leaks), with a short text body holding
    nothing secret; unless the answer says it closes, the connection then
    serves a shared file.
    """
    with HttpConnection(hostile_daemon.port) as conn:
        conn.request(method, target)
        response = conn.read_response()
        assert response.status == 404, f"{method} {target!r}: {response}"
        assert_no_leak(response, site)
        if method == "GET":
            assert_error_body(response)
        else:
            assert response.body == b""
        assert "x-injected" not in dict(response.headers)
        if "close" not in response.connection_tokens():
            again = conn.get("/small.txt")
            assert (again.status, again.body) == (200, SMALL)


@pytest.mark.parametrize("target", MALFORMED_TARGETS)
def test_malformed_targets_are_refused_and_leak_nothing(
    hostile_daemon: Daemon, site: Path, target: str
) -> None:
    """A target with bytes no URI holds, or escapes that are not UTF-8, is 400 or 404, and leaks nothing."""
    with HttpConnection(hostile_daemon.port) as conn:
        conn.request("GET", target)
        response = conn.read_response()
        assert response.status in (400, 404), f"{target!r}: {response}"
        assert_no_leak(response, site)
        assert_error_body(response)


def test_shared_files_and_links_inside_are_served(hostile_daemon: Daemon) -> None:
    """The controls: a link to a shared file, escapes of ordinary letters, the absolute form, a folder link inside."""
    with HttpConnection(hostile_daemon.port) as conn:
        for target, body in [
            ("/small.txt", SMALL),
            ("/link_in", SMALL),
            ("/%73ub/inner%2etxt", b"inner\n"),
            ("/%73UB/inner.txt".replace("UB", "ub"), b"inner\n"),
            ("/link_sub/inner.txt", b"inner\n"),
            ("http://127.0.0.1/small.txt", SMALL),
            ("/small.txt?x=../../outside/secret.txt", SMALL),
        ]:
            response = conn.get(target)
            assert (response.status, response.body) == (200, body), (target, response)
        conn.assert_open()


def test_listings_show_nothing_hostile(hostile_daemon: Daemon, site: Path) -> None:
    """The HTML and JSON listings of / and /sub/ name none of the refused entries."""
    refused = [b".hidden", b".git", b"link_out", b"dir_out", b"abs_link", b"link_hidden", b"link_git",
               b"fifo", b"dev_zero", b"dev_null", b"etc_link", b"passwd_link", b"loop", b"dangling",
               b"escape", b"secret", b">null<", b'"null', b"sock"]  # fmt: skip
    with HttpConnection(hostile_daemon.port) as conn:
        for target in ("/", "/sub/", "/?format=json", "/sub/?format=json"):
            response = conn.get(target)
            assert response.status == 200, (target, response)
            assert_no_leak(response, site)
            for name in refused:
                assert name not in response.body, f"{target} lists {name!r}"
            assert b"small.txt" in response.body or b"inner.txt" in response.body


# Request smuggling

SMUGGLE = b"GET /smuggled.txt HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

SMUGGLING = {
    "CL then TE": b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE then CL": b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    "two different CLs": b"Content-Length: 0\r\nContent-Length: 5\r\n\r\nhello",
    "two equal CLs": b"Content-Length: 0\r\nContent-Length: 0\r\n\r\n",
    "CL 5 after GET": b"Content-Length: 5\r\n\r\nhello",
    "CL with a plus": b"Content-Length: +5\r\n\r\nhello",
    "CL negative": b"Content-Length: -1\r\n\r\n",
    "CL hex": b"Content-Length: 0x5\r\n\r\nhello",
    "CL huge": b"Content-Length: 99999999999999999999999\r\n\r\n",
    "TE chunked": b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "TE chunked empty": b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE Chunked": b"Transfer-Encoding: Chunked\r\n\r\n0\r\n\r\n",
    "TE CHUNKED": b"TRANSFER-ENCODING: CHUNKED\r\n\r\n0\r\n\r\n",
    "te lower case": b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE no space": b"Transfer-Encoding:chunked\r\n\r\n0\r\n\r\n",
    "TE tab": b"Transfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n",
    "TE trailing spaces": b"Transfer-Encoding: chunked  \r\n\r\n0\r\n\r\n",
    "TE vertical tab": b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
    "TE space before colon": b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "TE tab before colon": b"Transfer-Encoding\t: chunked\r\n\r\n0\r\n\r\n",
    "TE folded": b"X-Pad: a\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE folded value": b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    "TE twice": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE list": b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "TE identity": b"Transfer-Encoding: identity\r\n\r\n",
    "TE xchunked": b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "TE empty": b"Transfer-Encoding:\r\n\r\n",
    "TE with CL 0": b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "Expect with a body": b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\nhello",
}


# Every case after a GET; a few after a HEAD too (the rest would fail or
# pass with those).
SMUGGLING_REQUESTS = [(case, "GET") for case in SMUGGLING] + [
    (case, "HEAD") for case in ("CL then TE", "two different CLs", "TE chunked", "CL 5 after GET")
]


@pytest.mark.parametrize("case, method", SMUGGLING_REQUESTS)
def test_smuggling_is_refused_and_the_smuggled_request_never_answered(
    hostile_daemon: Daemon, site: Path, case: str, method: str
) -> None:
    """
    A request that carries a body, or says it might (Transfer-Encoding in
    any spelling, a Content-Length other than 0, two Content-Lengths), is
    answered `400` and the connection closed; the request smuggled behind
    it is never answered.  The 400 to a HEAD has no body, as every answer
    to a HEAD (RFC 9112 section 6.3): h11 reads bytes after it as a second
    answer.
    """
    with HttpConnection(hostile_daemon.port) as conn:
        head = f"{method} /small.txt HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
        try:
            conn.send(head + SMUGGLING[case] + SMUGGLE)
        except (BrokenPipeError, ConnectionResetError):
            pass
        conn.expect(method)
        response = conn.read_response()
        assert response.status == 400, f"{case}: {response}"
        assert_no_leak(response, site)
        extra = conn.rest()
        assert extra == b"", f"{case}: after the 400 the daemon sent {extra[:300]!r}"


def test_a_get_with_content_length_zero_is_an_ordinary_request(hostile_daemon: Daemon) -> None:
    """The control: `Content-Length: 0` is no body, so the request after it is an ordinary pipelined one."""
    with HttpConnection(hostile_daemon.port) as conn:
        conn.send(request_bytes("GET", "/small.txt", [("Content-Length", "0")]) + SMUGGLE)
        conn.expect("GET")
        conn.expect("GET")
        first, second = conn.read_response(), conn.read_response()
        assert (first.status, first.body, second.status, second.body) == (200, SMALL, 200, SMUGGLED)
        conn.assert_open()


# Malformed heads

GOOD_LINE = b"GET /small.txt HTTP/1.1\r\n"
HOST = b"Host: 127.0.0.1\r\n"

# name -> (the head, after a first request line that decides for HTTP, and the status)
MALFORMED_HEADS: dict[str, tuple[bytes, int]] = {
    "bare CR in a value": (GOOD_LINE + HOST + b"X-A: a\rb\r\n\r\n", 400),
    "bare CR ending a line": (GOOD_LINE + HOST + b"X-A: a\r\r\n\r\n", 400),
    "bare CR alone": (GOOD_LINE + HOST + b"\r\r\n\r\n", 400),
    "obs-fold with a space": (GOOD_LINE + HOST + b"X-A: a\r\n b\r\n\r\n", 400),
    "obs-fold with a tab": (GOOD_LINE + HOST + b"X-A: a\r\n\tb\r\n\r\n", 400),
    "fold of the first header": (GOOD_LINE + b" Host: 127.0.0.1\r\n\r\n", 400),
    "space before the colon": (GOOD_LINE + HOST + b"X-A : b\r\n\r\n", 400),
    "space before Host's colon": (GOOD_LINE + b"Host : 127.0.0.1\r\n\r\n", 400),
    "tab before the colon": (GOOD_LINE + HOST + b"X-A\t: b\r\n\r\n", 400),
    "parenthesis in a name": (GOOD_LINE + HOST + b"X(A): b\r\n\r\n", 400),
    "space in a name": (GOOD_LINE + HOST + b"X A: b\r\n\r\n", 400),
    "quote in a name": (GOOD_LINE + HOST + b'"X": b\r\n\r\n', 400),
    "at sign in a name": (GOOD_LINE + HOST + b"X@A: b\r\n\r\n", 400),
    "brackets in a name": (GOOD_LINE + HOST + b"[X]: b\r\n\r\n", 400),
    "UTF-8 in a name": (GOOD_LINE + HOST + "Xé: b\r\n\r\n".encode(), 400),
    "empty name": (GOOD_LINE + HOST + b": b\r\n\r\n", 400),
    "line without a colon": (GOOD_LINE + HOST + b"NoColonHere\r\n\r\n", 400),
    "NUL in a value": (GOOD_LINE + HOST + b"X-A: a\x00b\r\n\r\n", 400),
    "SOH in a value": (GOOD_LINE + HOST + b"X-A: a\x01b\r\n\r\n", 400),
    "ESC in a value": (GOOD_LINE + HOST + b"X-A: \x1b[2J\r\n\r\n", 400),
    "DEL in a value": (GOOD_LINE + HOST + b"X-A: a\x7fb\r\n\r\n", 400),
    "no Host in 1.1": (GOOD_LINE + b"X-A: b\r\n\r\n", 400),
    "two Hosts in 1.1": (GOOD_LINE + HOST + b"Host: other\r\n\r\n", 400),
    "two equal Hosts in 1.1": (GOOD_LINE + HOST + HOST + b"\r\n", 400),
    "Host twice, cases differ": (GOOD_LINE + HOST + b"host: 127.0.0.1\r\n\r\n", 400),
    "two Hosts in 1.0": (b"GET /small.txt HTTP/1.0\r\n" + HOST + b"Host: other\r\n\r\n", 400),
    "HTTP/2.0": (b"GET /small.txt HTTP/2.0\r\n" + HOST + b"\r\n", 505),
    "HTTP/3.0": (b"GET /small.txt HTTP/3.0\r\n" + HOST + b"\r\n", 505),
    "HTTP/0.9": (b"GET /small.txt HTTP/0.9\r\n" + HOST + b"\r\n", 505),
    "HTTP/9.9": (b"GET /small.txt HTTP/9.9\r\n" + HOST + b"\r\n", 505),
    "malformed escape": (b"GET /%zz HTTP/1.1\r\n" + HOST + b"\r\n", 400),
    "short escape": (b"GET /small.txt%4 HTTP/1.1\r\n" + HOST + b"\r\n", 400),
    "lone percent": (b"GET /% HTTP/1.1\r\n" + HOST + b"\r\n", 400),
    "URI of 9,000 bytes": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + HOST + b"\r\n", 414),
    "URI of 10,000 bytes": (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n" + HOST + b"\r\n", 414),
    "URI of 1 MiB": (b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\n" + HOST + b"\r\n", 414),
    "header line of 9,000 bytes": (GOOD_LINE + HOST + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    "head of 40,000 bytes": (GOOD_LINE + HOST + b"".join(b"X-%d: %s\r\n" % (n, b"a" * 3990) for n in range(10)) + b"\r\n", 431),
    "101 header fields": (GOOD_LINE + HOST + b"".join(b"X-%d: v\r\n" % n for n in range(100)) + b"\r\n", 431),
    "a body after POST": (b"POST /small.txt HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\n\r\nhello", 400),
    "HEAD with NUL in a value": (b"HEAD /small.txt HTTP/1.1\r\n" + HOST + b"X-A: a\x00b\r\n\r\n", 400),
    "HEAD with obs-fold": (b"HEAD /small.txt HTTP/1.1\r\n" + HOST + b"X-A: a\r\n b\r\n\r\n", 400),
    "HEAD without Host": (b"HEAD /small.txt HTTP/1.1\r\n\r\n", 400),
    "HEAD in HTTP/2.0": (b"HEAD /small.txt HTTP/2.0\r\n" + HOST + b"\r\n", 505),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED_HEADS))
def test_malformed_heads_are_answered_and_closed(hostile_daemon: Daemon, site: Path, case: str) -> None:
    """
    Each malformed head of docs/http.md gets its status (400 malformed, 505
    another version, 414 a long URI, 431 long or many headers), a short
    text body, and a closed connection; nothing sent after it is answered.
    """
    data, status = MALFORMED_HEADS[case]
    with HttpConnection(hostile_daemon.port) as conn:
        try:
            conn.send(data + SMUGGLE)
        except (BrokenPipeError, ConnectionResetError):
            pass
        # The answer to a HEAD has no body, an error included (RFC 9112 6.3).
        conn.expect("HEAD" if data.startswith(b"HEAD ") else "GET")
        response = conn.read_response()
        if case == "a body after POST":
            assert response.status in (400, 405), f"{case}: {response}"
        else:
            assert response.status == status, f"{case}: {response}"
        if data.startswith(b"HEAD "):
            assert response["content-type"] == "text/plain; charset=utf-8"
        else:
            assert_error_body(response)
        assert_no_leak(response, site)
        extra = conn.rest()
        assert extra == b"", f"{case}: after the {status} the daemon sent {extra[:300]!r}"


# Second request lines that do not have the form of docs/http.md: the
# first request decided for HTTP, so these are 400 (as a first line they
# would be native requests).
MALFORMED_LINES = [
    b"GET  /small.txt HTTP/1.1",
    b"GET /small.txt  HTTP/1.1",
    b" GET /small.txt HTTP/1.1",
    b"GET\t/small.txt HTTP/1.1",
    b"GET /small.txt HTTP/1.1 x",
    b"GET /small.txt http/1.1",
    b"GET /small.txt HTTP/1",
    b"GET /small.txt HTTP/1.1.1",
    b"GET /small.txt HTTP/11.1",
    b"GET /small.txt",
    b"GET",
    b"GET /small.txt HTTP/1.1\r",
    b"G\x00T /small.txt HTTP/1.1",
    b"GET /sm all.txt HTTP/1.1",
    b"GET small.txt 0",
]


@pytest.mark.parametrize("line", MALFORMED_LINES)
def test_malformed_request_lines_on_an_http_connection(hostile_daemon: Daemon, line: bytes) -> None:
    """On a connection already speaking HTTP, a request line of another form is 400 and closed."""
    with HttpConnection(hostile_daemon.port) as conn:
        assert conn.get("/small.txt").body == SMALL
        conn.send(line + b"\r\n" + HOST + b"\r\n" + SMUGGLE)
        response = conn.read_response()
        assert response.status == 400, f"{line!r}: {response}"
        assert_error_body(response)
        assert conn.rest() == b""


def test_request_line_limit_on_an_http_connection(hostile_daemon: Daemon) -> None:
    """
    On a connection already speaking HTTP, a request line of 6,000 or
    7,000 bytes is served (404, 200), and one over 8,192 bytes is 414 and
    closed (a first line over 4,096 bytes is in MALFORMED_HEADS).
    """
    with HttpConnection(hostile_daemon.port) as conn:
        assert conn.get("/small.txt").status == 200
        assert conn.get("/" + "a" * 6000).status == 404
        assert conn.get("/small.txt?" + "q" * 7000).status == 200
        conn.send(b"GET /" + b"a" * 8200 + b" HTTP/1.1\r\n" + HOST + b"\r\n")
        response = conn.read_response()
        assert response.status == 414, response
        assert_error_body(response)
        conn.assert_closed()


def test_header_limits_at_the_edge(hostile_daemon: Daemon) -> None:
    """100 header fields and a header line just under 8,192 bytes are served; 101 fields are 431 (above)."""
    with HttpConnection(hostile_daemon.port) as conn:
        fields = [(f"X-{n}", "v") for n in range(99)]
        assert conn.get("/small.txt", fields).status == 200
        assert conn.get("/small.txt", [("X-Big", "a" * 8000)]).status == 200
        conn.assert_open()


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO", "get"])
def test_other_methods_are_405_with_allow(hostile_daemon: Daemon, method: str) -> None:
    """Methods other than GET and HEAD are 405 with `Allow: GET, HEAD`, and the connection goes on."""
    with HttpConnection(hostile_daemon.port) as conn:
        conn.request(method, "/small.txt")
        response = conn.read_response()
        assert response.status == 405, f"{method}: {response}"
        assert response["allow"] == "GET, HEAD"
        assert_error_body(response)
        again = conn.get("/small.txt")
        assert (again.status, again.body) == (200, SMALL)
        conn.assert_open()


@pytest.mark.parametrize("line", [b"CONNECT 127.0.0.1:443 HTTP/1.1", b"OPTIONS * HTTP/1.1"])
def test_other_target_forms_are_refused(hostile_daemon: Daemon, line: bytes) -> None:
    """The authority and asterisk forms are refused (400 or 405); a CONNECT never opens a tunnel."""
    with HttpConnection(hostile_daemon.port) as conn:
        conn.send(line + b"\r\n" + HOST + b"\r\n")
        response = conn.read_response()
        assert response.status in (400, 405), f"{line!r}: {response}"
        assert_error_body(response)


def test_http_1_0_without_host_is_served(hostile_daemon: Daemon) -> None:
    """The control for the Host rules: HTTP/1.0 may leave Host out; HTTP/1.9 is answered as 1.1."""
    with HttpConnection(hostile_daemon.port) as conn:
        conn.send(b"GET /small.txt HTTP/1.0\r\n\r\n")
        response = conn.read_response()
        assert (response.status, response.body) == (200, SMALL)
    with HttpConnection(hostile_daemon.port) as conn:
        conn.send(b"GET /small.txt HTTP/1.9\r\n" + HOST + b"\r\n")
        response = conn.read_response()
        assert (response.status, response.body, response.http_version) == (200, SMALL, "HTTP/1.1")


def test_the_daemon_survived_the_module(hostile_daemon: Daemon) -> None:
    """After everything above, the module's daemon still serves, logged no traceback and never answered a smuggled request."""
    with HttpConnection(hostile_daemon.port) as conn:
        assert conn.get("/small.txt").body == SMALL
    text = hostile_daemon.log_text()
    assert "Traceback" not in text
    assert hostile_daemon.process.poll() is None


# Limits and floods


def test_connection_limit_is_503_with_retry_after(shared: Path, daemon_factory: DaemonFactory) -> None:
    """Past --max-per-ip, an HTTP client gets `503` with `Retry-After: 1` and a close; a native one gets ERR busy."""
    (shared / "small.txt").write_bytes(SMALL)
    daemon = daemon_factory(shared, "--max-per-ip", "2")
    holders = [HttpConnection(daemon.port) for _ in range(2)]
    try:
        for holder in holders:
            assert holder.get("/small.txt").status == 200
        with HttpConnection(daemon.port) as refused:
            refused.request("GET", "/small.txt")
            response = refused.read_response()
            assert response.status == 503, response
            assert response["retry-after"] == "1"
            assert "close" in response.connection_tokens()
            refused.assert_closed()
        native = RawClient(daemon.port)
        try:
            native.send(b"GET small.txt\r\n")
            assert native.line().startswith(b"ERR busy")
        finally:
            native.close()
    finally:
        for holder in holders:
            holder.close()


def raise_descriptor_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"the descriptor limit is {hard}, {needed} are needed")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def test_slow_header_flood_is_cut_by_the_head_timeout(shared: Path, daemon_factory: DaemonFactory) -> None:
    """
    500 connections each sending a header byte a second (half after a
    whole request line, half from the first byte): the head timeout
    (--idle-timeout 3) closes every one of them without an answer though
    bytes keep coming, while another client keeps fetching files
    successfully, over one kept-alive connection and over new ones.
    """
    raise_descriptor_limit(2048)
    (shared / "small.txt").write_bytes(SMALL * 200)
    big = write_pattern(shared / "big.bin", 1 << 20, seed=11)
    timeout = 3
    daemon = daemon_factory(
        shared, "--idle-timeout", str(timeout), "--max-connections", "1000", "--max-per-ip", "1000",
        "--no-access-log",
    )  # fmt: skip
    head = b"GET /small.txt HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"z" * 64
    flood: list[socket.socket] = []
    stop = threading.Event()
    dripper: threading.Thread | None = None
    selector = selectors.DefaultSelector()
    try:
        started = time.monotonic()
        for n in range(500):
            sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
            if n % 2 == 0:
                sock.sendall(b"GET /small.txt HTTP/1.1\r\n")
            flood.append(sock)
        opened = time.monotonic()

        def drip() -> None:
            position = {id(s): (len(b"GET /small.txt HTTP/1.1\r\n") if n % 2 == 0 else 0) for n, s in enumerate(flood)}
            while not stop.wait(1.0):
                for sock in flood:
                    i = position[id(sock)]
                    try:
                        sock.send(head[i : i + 1])
                    except OSError:
                        pass
                    position[id(sock)] = i + 1

        dripper = threading.Thread(target=drip, name="drip", daemon=True)
        dripper.start()
        for sock in flood:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        still_open = set(flood)
        answered: list[bytes] = []
        latencies: list[float] = []
        small = SMALL * 200
        big_bytes = big.read_bytes()
        deadline = opened + timeout + 4
        with HttpConnection(daemon.port) as kept:
            while still_open and time.monotonic() < deadline:
                t0 = time.perf_counter()
                assert kept.get("/small.txt").body == small
                with HttpConnection(daemon.port) as fresh:
                    assert fresh.get("/big.bin").body == big_bytes
                latencies.append(time.perf_counter() - t0)
                for key, _ in selector.select(0.05):
                    ready = key.fileobj
                    assert isinstance(ready, socket.socket)
                    try:
                        data = ready.recv(4096)
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        data = b""
                    if data:
                        answered.append(data)
                    else:
                        selector.unregister(ready)
                        still_open.discard(ready)
        took = time.monotonic() - started
        latencies.sort()
        worst = latencies[-1] if latencies else 0.0
        print(
            f"\nslow-header flood: 500 connections closed after {took:.1f} s; {len(latencies)} fetch pairs "
            f"meanwhile, median {latencies[len(latencies) // 2] * 1000:.1f} ms, worst {worst * 1000:.1f} ms"
        )
        assert not still_open, f"{len(still_open)} of 500 slow connections still open after {took:.1f} s"
        assert answered == [], f"the flood got answers: {answered[:3]!r}"
        assert len(latencies) >= 10
        assert worst < 1.0, f"a fetch took {worst * 1000:.0f} ms during the flood"
    finally:
        stop.set()
        if dripper is not None:
            dripper.join(5)
        selector.close()
        for sock in flood:
            sock.close()
    wait_for(lambda: stats(daemon.port)["connections_active"] == 1, 10, "the daemon to drop the flood")
    assert daemon.process.poll() is None
