"""
Tests for L{filecache.daemon.folder.SharedFolder}: which paths open to a shared
regular file, when an opened file is still current, and what is listed.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import resource
import signal
import socket
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from filecache.daemon.beneath import beneath_opener
from filecache.daemon.folder import FileStat, NotShared, OpenedFile, SharedFolder, Unreadable
from filecache.wire import quote_path, unquote_path


def list_files(folder: SharedFolder) -> list[tuple[str, FileStat]]:
    """
    Every file a whole walk of C{folder} lists, as (wire path, state),
    sorted by the path's UTF-8 bytes (the walk itself does not sort).
    """
    found: list[tuple[bytes, FileStat]] = []
    walk = folder.walk()
    try:
        while (rows := walk.next_rows(lambda path, st: (path, FileStat.of(st)))) is not None:
            found.extend(rows)
    finally:
        walk.close()
    found.sort(key=lambda row: row[0])
    return [(path.decode("utf-8"), st) for path, st in found]


def write(root: Path, relative: str, data: bytes = b"data") -> Path:
    """Create the file C{relative} under C{root}, with its parent directories."""
    target = root / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def read_all(opened: OpenedFile) -> bytes:
    """Everything readable from the opened file's descriptor, from the start."""
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(opened.fd, 65536, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def open_fds() -> int:
    """The number of descriptors this process has open now."""
    # A SharedFolder holds its folder's descriptor until it is collected:
    # folders of earlier tests (in reference cycles) go first, not midway.
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


@contextmanager
def prompt(seconds: int = 5) -> Iterator[None]:
    """Fail, instead of hanging the test run, if the body blocks for C{seconds}."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty directory to share, with a sibling file and directory outside it."""
    shared = tmp_path / "share"
    shared.mkdir()
    (tmp_path / "outside.txt").write_bytes(b"secret outside")
    (tmp_path / "outside_dir").mkdir()
    (tmp_path / "outside_dir" / "f").write_bytes(b"secret outside dir")
    return shared


@pytest.fixture(params=["openat2", "proc"])
def folder(root: Path, request: pytest.FixtureRequest) -> SharedFolder:
    """
    A SharedFolder over C{root}, opening files either way: beneath the
    folder's descriptor by C{openat2} (where the kernel has it), or by path
    with a look at where the open led.  Every test of the folder runs both.
    """
    shared = SharedFolder(str(root))
    if request.param == "proc":
        shared._beneath = None
    elif shared._beneath is None:
        pytest.skip("openat2 is not available here")
    return shared


# Construction


def test_root_must_be_a_directory(tmp_path: Path) -> None:
    """SharedFolder refuses a missing root and a root that is a file."""
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        SharedFolder(str(tmp_path / "file"))
    with pytest.raises(NotADirectoryError):
        SharedFolder(str(tmp_path / "missing"))


def test_root_given_through_symlink(root: Path, tmp_path: Path) -> None:
    """A root named through a symlink is resolved, and its files are served."""
    write(root, "f.txt", b"hello")
    (tmp_path / "alias").symlink_to(root)
    folder = SharedFolder(str(tmp_path / "alias"))
    assert folder.root == os.path.realpath(root)
    opened = folder.open("f.txt")
    try:
        assert read_all(opened) == b"hello"
    finally:
        opened.close()
    assert [path for path, _ in list_files(folder)] == ["f.txt"]


def test_root_inside_dot_directory_is_served(tmp_path: Path) -> None:
    """Only components below the root count as hidden: a root under ~/.local-like dirs still serves."""
    shared = tmp_path / ".config" / "share"
    write(shared, "sub/f.txt", b"visible")
    folder = SharedFolder(str(shared))
    opened = folder.open("sub/f.txt")
    try:
        assert read_all(opened) == b"visible"
    finally:
        opened.close()
    assert [path for path, _ in list_files(folder)] == ["sub/f.txt"]


# open(): what is served


def test_open_regular_file(root: Path, folder: SharedFolder) -> None:
    """open() returns the file's content, wire path, real path and stat, on a close-on-exec fd."""
    target = write(root, "hello.txt", b"Hello from filecache.\n")
    opened = folder.open("hello.txt")
    try:
        assert opened.path == "hello.txt"
        assert opened.real == os.path.realpath(target)
        assert read_all(opened) == b"Hello from filecache.\n"
        assert opened.stat == FileStat.of(os.stat(target))
        assert opened.stat.size == 22
        assert not os.get_inheritable(opened.fd)
    finally:
        opened.close()


def test_open_nested_file(root: Path, folder: SharedFolder) -> None:
    """open() follows plain sub-directories to a nested file."""
    write(root, "a/b/c/deep.txt", b"deep")
    write(root, "a/b/c/name with spaces \u00e9.txt", b"spaced")
    opened = folder.open("a/b/c/deep.txt")
    try:
        assert read_all(opened) == b"deep"
        assert opened.real == os.path.join(folder.root, "a", "b", "c", "deep.txt")
    finally:
        opened.close()
    opened = folder.open("a/b/c/name with spaces \u00e9.txt")
    try:
        assert read_all(opened) == b"spaced"
    finally:
        opened.close()


def test_open_empty_file(root: Path, folder: SharedFolder) -> None:
    """An empty regular file is served with size 0."""
    write(root, "empty", b"")
    opened = folder.open("empty")
    try:
        assert opened.stat.size == 0
        assert read_all(opened) == b""
    finally:
        opened.close()


def test_symlink_to_file_inside_is_served(root: Path, folder: SharedFolder) -> None:
    """A symlink to a regular file inside the folder is served, with the target as its real path."""
    target = write(root, "docs/real.txt", b"real content")
    (root / "alias.txt").symlink_to("docs/real.txt")
    (root / "abs-alias.txt").symlink_to(target)
    for name in ("alias.txt", "abs-alias.txt"):
        opened = folder.open(name)
        try:
            assert read_all(opened) == b"real content"
            assert opened.real == os.path.realpath(target)
            assert opened.path == name
        finally:
            opened.close()


def test_symlinked_directory_inside_is_served(root: Path, folder: SharedFolder) -> None:
    """A file reached through a symlink to a directory inside the folder is served."""
    target = write(root, "real/f.txt", b"through a dir link")
    (root / "linkdir").symlink_to("real")
    opened = folder.open("linkdir/f.txt")
    try:
        assert read_all(opened) == b"through a dir link"
        assert opened.real == os.path.realpath(target)
    finally:
        opened.close()


def test_resolve(root: Path, folder: SharedFolder) -> None:
    """resolve() gives the real path of a shared path and refuses a hidden one."""
    target = write(root, "a/b.txt")
    assert folder.resolve("a/b.txt") == os.path.realpath(target)
    with pytest.raises(NotShared):
        folder.resolve("a/../b.txt")


# open(): what is not served


def _setup_refusals(root: Path) -> None:
    """A folder holding every kind of thing that must not be served, next to plain files."""
    outside = root.parent
    write(root, "f.txt", b"plain")
    write(root, "sub/g.txt", b"plain too")
    write(root, ".env", b"hidden")
    write(root, ".git/config", b"hidden")
    write(root, "sub/.hidden", b"hidden")
    write(root, ".private/secret", b"hidden")
    write(root, "back\\slash", b"backslash in name")
    (root / "out").symlink_to("../outside.txt")
    (root / "out-abs").symlink_to(outside / "outside.txt")
    (root / "out-dir").symlink_to("../outside_dir")
    (root / "etc-passwd").symlink_to("/etc/passwd")
    (root / "to-secret").symlink_to(".private/secret")
    (root / "to-private").symlink_to(".private")
    (root / "to-env").symlink_to(".env")
    (root / "self-loop").symlink_to("self-loop")
    (root / "loop-a").symlink_to("loop-b")
    (root / "loop-b").symlink_to("loop-a")
    (root / "dangling").symlink_to("no-such-file")
    (root / "to-root").symlink_to(".")
    (root / "to-sub").symlink_to("sub")


REFUSED = [
    "missing",
    "sub/missing",
    "f.txt/x",
    "sub",
    "sub/",
    "to-sub",
    "to-root",
    "",
    ".env",
    ".git/config",
    ".git",
    "sub/.hidden",
    ".private/secret",
    ".",
    "..",
    "./f.txt",
    "../outside.txt",
    "../share/f.txt",
    "sub/../f.txt",
    "sub//g.txt",
    "/etc/passwd",
    "out",
    "out-abs",
    "out-dir/f",
    "etc-passwd",
    "to-secret",
    "to-private/secret",
    "to-env",
    "self-loop",
    "self-loop/x",
    "loop-a",
    "loop-b/x",
    "dangling",
    "back\\slash",
    "f.txt\x00",
    "a\x00b",
    "sub\\g.txt",
]


@pytest.mark.parametrize("path", REFUSED)
def test_not_shared(root: Path, folder: SharedFolder, path: str) -> None:
    """Absent, hidden, outside, looping, malformed or non-regular paths raise NotShared."""
    _setup_refusals(root)
    with prompt(), pytest.raises(NotShared):
        folder.open(path)


def test_absolute_path_inside_root_not_shared(root: Path, folder: SharedFolder) -> None:
    """An absolute path is refused even when it names a shared file."""
    target = write(root, "f.txt")
    with pytest.raises(NotShared):
        folder.open(str(target))


def test_fifo_not_shared_and_does_not_block(root: Path, folder: SharedFolder) -> None:
    """A FIFO (directly or through a symlink) is NotShared, promptly, with no writer present."""
    os.mkfifo(root / "fifo")
    (root / "fifo-link").symlink_to("fifo")
    for path in ("fifo", "fifo-link"):
        with prompt(), pytest.raises(NotShared):
            folder.open(path)


def test_unix_socket_not_shared(
    root: Path, folder: SharedFolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A UNIX socket file is NotShared."""
    monkeypatch.chdir(root)  # bind by a short relative name: socket paths are limited
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind("sock")
        sock.listen(1)
        assert stat.S_ISSOCK(os.lstat(root / "sock").st_mode)
        with prompt(), pytest.raises(NotShared):
            folder.open("sock")


def test_device_not_shared(root: Path, folder: SharedFolder) -> None:
    """A character device (a copy of /dev/null) inside the folder is NotShared."""
    try:
        os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod is not permitted here")
    with prompt(), pytest.raises(NotShared):
        folder.open("null")


def test_path_with_ten_thousand_components(root: Path, folder: SharedFolder) -> None:
    """A path of 10,000 components is NotShared, promptly, not an OSError or a crash."""
    write(root, "a/f.txt")
    for path in ("a/" * 9_999 + "a", "a/" * 9_999 + "f.txt", "x/" * 10_000 + "f"):
        assert path.count("/") >= 9_999
        with prompt(), pytest.raises(NotShared):
            folder.open(path)


def test_long_component(root: Path, folder: SharedFolder) -> None:
    """A component longer than NAME_MAX is NotShared, not an OSError."""
    with pytest.raises(NotShared):
        folder.open("x" * 300)


# open(): shared but unreadable


_CAP_DAC_OVERRIDE = 1
_CAP_DAC_READ_SEARCH = 2


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


@contextmanager
def permission_checks_apply() -> Iterator[None]:
    """
    Make file permission bits apply to this thread.  As root, clear
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the effective set (they stay
    permitted, so they are restored afterwards); skip if that is impossible.
    """
    if os.geteuid() != 0:
        yield
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        capget, capset = libc.capget, libc.capset
    except (OSError, AttributeError):
        pytest.skip("running as root and capget/capset are unavailable to drop DAC override")
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (_CapData * 2)()
    if capget(ctypes.byref(header), data) != 0:
        pytest.skip("running as root and capget failed")
    saved = [(d.effective, d.permitted, d.inheritable) for d in data]
    data[0].effective &= ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH))
    if capset(ctypes.byref(header), data) != 0:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE")
    try:
        yield
    finally:
        for d, (effective, permitted, inheritable) in zip(data, saved):
            d.effective, d.permitted, d.inheritable = effective, permitted, inheritable
        assert capset(ctypes.byref(header), data) == 0


def test_mode_000_file_is_unreadable(root: Path, folder: SharedFolder) -> None:
    """A shared file without read permission raises Unreadable (EACCES), not NotShared, and is still listed."""
    target = write(root, "locked.txt", b"no reading")
    os.chmod(target, 0)
    try:
        with permission_checks_apply():
            with pytest.raises(OSError):
                os.close(os.open(target, os.O_RDONLY))  # the precondition holds
            before = open_fds()
            with pytest.raises(Unreadable) as info:
                folder.open("locked.txt")
            assert open_fds() == before
            assert info.value.error.errno == errno.EACCES
            assert "locked.txt" in str(info.value)
            assert [path for path, _ in list_files(folder)] == ["locked.txt"]
    finally:
        os.chmod(target, 0o644)


def test_out_of_descriptors_is_unreadable(root: Path, folder: SharedFolder) -> None:
    """When no descriptor can be allocated (EMFILE), open() raises Unreadable, not NotShared."""
    write(root, "f.txt", b"x")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open(os.devnull, os.O_RDONLY)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        with pytest.raises(Unreadable) as info:
            folder.open("f.txt")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert info.value.error.errno == errno.EMFILE


# Descriptor hygiene


def test_no_descriptor_leaks(root: Path, folder: SharedFolder) -> None:
    """Failed opens (refused paths, FIFOs, directories, sockets) and open()+close() leave no descriptor open."""
    _setup_refusals(root)
    os.mkfifo(root / "fifo")
    (root / "fifo-link").symlink_to("fifo")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        cwd = os.getcwd()
        os.chdir(root)
        try:
            sock.bind("sock")
        finally:
            os.chdir(cwd)
        before = open_fds()
        for _ in range(3):
            for path in REFUSED + ["fifo", "fifo-link", "sock", "sub", "to-sub"]:
                with prompt(), pytest.raises(NotShared):
                    folder.open(path)
        assert open_fds() == before

        opened = [folder.open("f.txt") for _ in range(5)]
        # The count does move: five open files are five more descriptors.
        assert open_fds() == before + 5
        for one in opened:
            one.close()
        assert open_fds() == before

        opened_one = folder.open("sub/g.txt")
        opened_one.close()
        opened_one.close()  # closing twice is harmless
        list_files(folder)
        assert open_fds() == before


# is_current()


@pytest.fixture
def opened_file(root: Path, folder: SharedFolder) -> Iterator[tuple[Path, OpenedFile]]:
    """An opened shared file of 10 bytes, and its path on disk."""
    target = write(root, "f.txt", b"0123456789")
    os.utime(target, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    opened = folder.open("f.txt")
    yield target, opened
    opened.close()


def test_is_current_unchanged(folder: SharedFolder, opened_file: tuple[Path, OpenedFile]) -> None:
    """An unchanged file is current, and stays so when asked again or after reading."""
    _, opened = opened_file
    assert folder.is_current(opened) is True
    read_all(opened)
    assert folder.is_current(opened) is True


def _append(target: Path) -> None:
    with open(target, "ab") as f:
        f.write(b"more")


def _truncate(target: Path) -> None:
    os.truncate(target, 3)


def _rewrite_same_size(target: Path) -> None:
    with open(target, "r+b") as f:
        f.write(b"abcdefghij")
    os.utime(target, ns=(1_700_000_000_000_000_001, 1_700_000_000_000_000_001))


def _touch_mtime(target: Path) -> None:
    os.utime(target, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000 + 1))


def _replace_by_rename(target: Path) -> None:
    fresh = target.with_name("f.txt.new")
    fresh.write_bytes(b"0123456789")
    os.utime(fresh, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    os.replace(fresh, target)


def _delete(target: Path) -> None:
    os.unlink(target)


def _replace_by_symlink(target: Path) -> None:
    other = target.with_name("other.txt")
    other.write_bytes(b"0123456789")
    os.unlink(target)
    target.symlink_to("other.txt")


@pytest.mark.parametrize(
    "change",
    [
        _append,
        _truncate,
        _rewrite_same_size,
        _touch_mtime,
        _replace_by_rename,
        _delete,
        _replace_by_symlink,
    ],
)
def test_is_current_false_after_change(
    folder: SharedFolder, opened_file: tuple[Path, OpenedFile], change: Callable[[Path], None]
) -> None:
    """After an append, truncate, same-size rewrite with a new mtime, rename over, or delete, the file is not current."""
    target, opened = opened_file
    assert folder.is_current(opened) is True
    change(target)
    assert folder.is_current(opened) is False


# list_files()


def test_list_empty(folder: SharedFolder) -> None:
    """An empty folder lists nothing."""
    assert list_files(folder) == []


def test_list_files_tree(root: Path, folder: SharedFolder, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    list_files() recurses, sorts by the UTF-8 bytes of the path, and leaves
    out dot-files, dot-directories, FIFOs, sockets, devices, dangling links,
    symlinks leading outside or into hidden places, and directories; it
    includes symlinks to files inside.
    """
    _setup_refusals(root)
    # Covered by their own tests below: a backslash name and a second path
    # to a directory.
    (root / "back\\slash").unlink()
    (root / "to-sub").unlink()
    write(root, "a-b", b"1")
    write(root, "a.b", b"22")
    write(root, "a/x.txt", b"333")
    write(root, "a/y/z.txt", b"4444")
    write(root, "a0", b"55555")
    write(root, "Z.txt", b"666666")
    write(root, "\u00e9.txt", b"7")
    write(root, "\U0001f600", b"8")
    write(root, "\uff21", b"9")  # FULLWIDTH A: sorts between e-acute and the emoji
    write(root, "empty", b"")
    (root / "in-link").symlink_to("a/x.txt")
    os.mkfifo(root / "fifo")
    monkeypatch.chdir(root)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind("sock")
        listed = list_files(folder)
    names = [path for path, _ in listed]
    assert names == [
        "Z.txt",
        "a-b",
        "a.b",
        "a/x.txt",
        "a/y/z.txt",
        "a0",
        "empty",
        "f.txt",
        "in-link",
        "sub/g.txt",
        "\u00e9.txt",
        "\uff21",
        "\U0001f600",
    ]
    assert names == sorted(names, key=lambda n: n.encode("utf-8"))


def test_list_files_stats(root: Path, folder: SharedFolder) -> None:
    """Each listed FileStat has the file's size, mtime and inode (the target's, for a symlink)."""
    write(root, "a.txt", b"abc")
    write(root, "d/b.txt", b"x" * 1000)
    (root / "link").symlink_to("d/b.txt")
    os.utime(root / "a.txt", ns=(1, 1_234_567_890_123_456_789))
    listed = dict(list_files(folder))
    assert set(listed) == {"a.txt", "d/b.txt", "link"}
    assert listed["a.txt"].size == 3
    assert listed["a.txt"].mtime_ns == 1_234_567_890_123_456_789
    assert listed["a.txt"].mtime == 1_234_567_890
    assert listed["d/b.txt"].size == 1000
    for path, st in listed.items():
        assert st == FileStat.of(os.stat(root / path))
    assert listed["link"] == listed["d/b.txt"]


def test_list_files_agrees_with_open(root: Path, folder: SharedFolder) -> None:
    """Every listed path opens, its version matching the listed one, and survives the wire encoding."""
    _setup_refusals(root)
    write(root, "a/b c/\u00e9%.txt", b"odd name")
    (root / "in-link").symlink_to("f.txt")
    listed = list_files(folder)
    assert listed
    for path, st in listed:
        assert unquote_path(quote_path(path)) == path
        opened = folder.open(path)
        try:
            assert opened.stat == st
        finally:
            opened.close()


def test_list_files_skips_names_that_cannot_be_fetched(root: Path, folder: SharedFolder) -> None:
    """A file whose name holds a backslash is refused by open(), so it is not listed either."""
    write(root, "plain.txt")
    write(root, "back\\slash.txt")
    write(root, "dir\\name/inner.txt")
    with pytest.raises(NotShared):
        folder.open("back\\slash.txt")
    assert [path for path, _ in list_files(folder)] == ["plain.txt"]


def test_list_files_skips_non_utf8_names(root: Path, folder: SharedFolder) -> None:
    """Files and directories whose names are not UTF-8 are left out, with what they contain."""
    write(root, "good.txt")
    raw_root = os.fsencode(root)
    with open(os.path.join(raw_root, b"bad\xff"), "wb") as f:
        f.write(b"x")
    os.mkdir(os.path.join(raw_root, b"dir\xfe"))
    with open(os.path.join(raw_root, b"dir\xfe", b"inner.txt"), "wb") as f:
        f.write(b"x")
    assert len(os.listdir(raw_root)) == 3
    assert [path for path, _ in list_files(folder)] == ["good.txt"]


def test_list_files_does_not_loop(root: Path, folder: SharedFolder) -> None:
    """Symlinks back to a parent directory or the root do not make list_files loop or repeat files."""
    write(root, "a/b/f.txt")
    write(root, "top.txt")
    (root / "a" / "up").symlink_to("..")
    (root / "a" / "b" / "up").symlink_to("..")
    (root / "a" / "b" / "top").symlink_to("../..")
    (root / "a" / "b" / "self").symlink_to(".")
    (root / "a" / "b" / "abs-root").symlink_to(root)
    with prompt():
        names = [path for path, _ in list_files(folder)]
    assert names.count("top.txt") == 1
    assert "a/b/f.txt" in names
    assert len(names) == len(set(names))
    assert all(name.count("/") < 10 for name in names)


def test_list_files_keeps_real_directory_beside_symlink_to_it(
    root: Path, folder: SharedFolder
) -> None:
    """
    A plain file in a plain directory is listed even when symlinks to that
    directory exist elsewhere in the folder (whatever order the directory is
    read in).
    """
    write(root, "real/f.txt")
    for name in ("aa", "link", "mm", "zz", "0", "Q", "r", "s"):
        (root / name).symlink_to("real")
    names = [path for path, _ in list_files(folder)]
    assert "real/f.txt" in names


def test_list_files_lists_what_open_serves_through_dir_symlink(
    root: Path, folder: SharedFolder
) -> None:
    """
    A file that open() serves through a symlinked directory is listed once,
    at its real place: the walk does not follow symlinks to folders (issue 8,
    item 7: a fan of links must not multiply the walk), while GET still
    follows them inside the folder.
    """
    write(root, "real/f.txt")
    (root / "link").symlink_to("real")
    opened = folder.open("link/f.txt")
    opened.close()
    assert [path for path, _ in list_files(folder)] == ["real/f.txt"]


# FileStat


def test_file_stat_version() -> None:
    """
    The version is lower-case hex of inode, size, mtime_ns and ctime_ns
    joined by '-', changing with each.
    """
    base = FileStat(ino=0x7C8CE, size=22, mtime_ns=0x18EA3FDC92C71808, ctime_ns=0x18EA3FDC92C71900)
    assert base.version == "7c8ce-16-18ea3fdc92c71808-18ea3fdc92c71900"
    assert FileStat(0x7C8CE, 22, 0x18EA3FDC92C71808, 0x18EA3FDC92C71900).version == base.version
    assert FileStat(0x7C8CE, 23, 0x18EA3FDC92C71808, 0x18EA3FDC92C71900).version != base.version
    assert FileStat(0x7C8CE, 22, 0x18EA3FDC92C71809, 0x18EA3FDC92C71900).version != base.version
    assert FileStat(0x7C8CF, 22, 0x18EA3FDC92C71808, 0x18EA3FDC92C71900).version != base.version
    assert FileStat(0x7C8CE, 22, 0x18EA3FDC92C71808, 0x18EA3FDC92C71901).version != base.version
    assert FileStat(1, 0, 0, 0).version == "1-0-0-0"


def test_file_stat_mtime_whole_seconds() -> None:
    """mtime is mtime_ns in whole seconds, rounded down."""
    assert FileStat(1, 1, 1_999_999_999, 0).mtime == 1
    assert FileStat(1, 1, 2_000_000_000, 0).mtime == 2
    assert FileStat(1, 1, 0, 0).mtime == 0


def test_file_stat_version_follows_disk(root: Path) -> None:
    """FileStat.of a real file changes version when its size or its mtime_ns changes."""
    target = write(root, "f", b"abc")
    os.utime(target, ns=(5_000_000_000, 5_000_000_000))
    first = FileStat.of(os.stat(target))
    assert (first.size, first.mtime_ns, first.ino) == (3, 5_000_000_000, os.stat(target).st_ino)
    os.utime(target, ns=(5_000_000_000, 5_000_000_001))
    second = FileStat.of(os.stat(target))
    assert second.version != first.version
    with open(target, "ab") as f:
        f.write(b"d")
    os.utime(target, ns=(5_000_000_000, 5_000_000_001))
    third = FileStat.of(os.stat(target))
    assert third.size == 4
    assert third.version not in (first.version, second.version)


def test_open_without_proc_confines_the_same_way(tmp_path: Path) -> None:
    """Where /proc is missing, open() resolves first and refuses the same paths as with it."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.txt").write_bytes(b"ok")
    (root / "sub").mkdir()
    (root / "sub" / "in.txt").write_bytes(b"in")
    (tmp_path / "outside.txt").write_bytes(b"outside")
    (root / "link-out").symlink_to(tmp_path / "outside.txt")
    (root / "link-in").symlink_to(root / "sub" / "in.txt")
    os.mkfifo(root / "fifo")
    folder = SharedFolder(str(root))
    folder._proc_fds = False
    folder._beneath = None
    opened = folder.open("link-in")
    try:
        assert os.pread(opened.fd, 10, 0) == b"in"
        assert opened.real == str(root / "sub" / "in.txt")
        assert opened.source == str(root / "link-in")
    finally:
        opened.close()
    for path in ("link-out", "fifo", "sub", "../outside.txt", "missing"):
        with pytest.raises(NotShared):
            folder.open(path)


# Opening beneath the folder's descriptor (openat2)


def test_the_opener_refuses_symlinks_and_paths_that_leave(root: Path) -> None:
    """
    C{openat2} beneath the folder opens a nested file, and refuses a symlink
    anywhere on the way (even one that stays inside) and every path that
    would leave the folder, absolute or by C{..}.
    """
    write(root, "sub/in.txt", b"in")
    (root / "link-sub").symlink_to("sub")
    (root / "link-file").symlink_to("sub/in.txt")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        opener = beneath_opener(fd, os.O_RDONLY | os.O_CLOEXEC)
        if opener is None:
            pytest.skip("openat2 is not available here")
        opened = opener.open("sub/in.txt")
        assert os.pread(opened, 10, 0) == b"in"
        os.close(opened)
        for path, code in [
            ("link-sub/in.txt", errno.ELOOP),
            ("link-file", errno.ELOOP),
            ("../outside.txt", errno.EXDEV),
            ("sub/../../outside.txt", errno.EXDEV),
            ("/etc/hostname", errno.EXDEV),
            ("missing", errno.ENOENT),
        ]:
            with pytest.raises(OSError) as info:
                opener.open(path)
            assert info.value.errno == code, path
    finally:
        os.close(fd)


def test_symlinks_inside_are_followed_the_long_way(root: Path, folder: SharedFolder) -> None:
    """
    A file reached through a symlink that stays inside is still shared
    (opened by path and checked where it led), whichever way the folder
    opens plain paths: the refusal of symlinks by C{openat2} only sends it
    the long way.
    """
    write(root, "sub/in.txt", b"in")
    (root / "link-sub").symlink_to("sub")
    (root / "link-file").symlink_to("sub/in.txt")
    for path in ("link-sub/in.txt", "link-file", "sub/in.txt"):
        opened = folder.open(path)
        try:
            assert read_all(opened) == b"in"
            assert opened.real == str(root / "sub" / "in.txt")
        finally:
            opened.close()
