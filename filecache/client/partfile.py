"""
The partial file a download is written to, C{.NAME.filecache-part}, with the
sidecar that lets a later attempt resume it; moved to NAME once verified.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from typing import IO

from filecache.client.errors import LocalError, VersionChanged
from filecache.client.localdigests import Stamp, stamp_of
from filecache.client.progress import Progress

# A download of NAME is written to .NAME.filecache-part beside NAME.  The
# server never shares a dot-name, so no download's final name is ever one of
# these, and a user's own NAME.part is never touched.
PART_SUFFIX = ".filecache-part"
META_SUFFIX = PART_SUFFIX + ".json"
MAX_META_BYTES = 64 * 1024
"""A sidecar is a line of JSON; anything longer was not written by us."""
SMALL_BODY = 64 * 1024
"""A whole body up to this size is held in memory until its digest is
checked, then written and moved into place in one step: no sidecar (there
is nothing worth resuming), a third of the system calls per small file."""

# Opening with these never blocks (a FIFO) and never follows a symlink.
_NO_SURPRISES = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def part_names(final: str) -> tuple[str, str]:
    """The partial file and its sidecar for a download saved as C{final}."""
    folder, name = os.path.split(final)
    part = os.path.join(folder, "." + name + PART_SUFFIX)
    return part, os.path.join(folder, "." + name + META_SUFFIX)


@dataclass(frozen=True)
class PartInfo:
    """What the sidecar of a partial file records: enough to resume it."""

    path: str
    version: str
    size: int


def _is_regular(path: str) -> bool:
    """Whether C{path} is a regular file itself (not a symlink to one)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _open_regular(path: str, flags: int, mode: int = 0o644) -> int:
    """
    Open C{path} without following a symlink or blocking on a FIFO, and
    only if it is a regular file; return the descriptor.

    @raise OSError: if it cannot be opened or is not a regular file.
    """
    fd = os.open(path, flags | _NO_SURPRISES, mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


class PartFile:
    """
    A L{BodySink} writing into C{.NAME.filecache-part} beside the final
    C{NAME}, from the start or appending to what an earlier attempt left;
    L{commit} moves it to the final name.

    A partial file is ours only while its sidecar says so (the sidecar is
    written first); anything else found under these names is someone
    else's, and without C{force} it is neither truncated nor removed.
    C{replacing}: the stamp of a file under the final name that may be
    replaced (one this client saved, since changed on the server), if it
    still has it.
    """

    def __init__(
        self,
        final: str,
        name: str,
        progress: Progress,
        force: bool = False,
        replacing: Stamp | None = None,
    ) -> None:
        self.final = final
        self._replacing = replacing
        self.part, self.meta = part_names(final)
        self._name = name
        self._progress = progress
        self._force = force
        self._file: IO[bytes] | None = None
        self._offset = 0
        self._expect_version: str | None = None
        self._owned = False
        self._sidecar_seen = False
        """Whether claim found a sidecar (ours or, with --force, one commit removes)."""
        self._info: PartInfo | None = None
        # A small body, whole in memory until commit (SMALL_BODY).
        self._held: bytearray | None = None
        self._held_info: PartInfo | None = None

    # What an earlier attempt left

    def _read_meta(self) -> tuple[bool, PartInfo | None]:
        """(whether a sidecar is there, its record if it is ours)."""
        try:
            fd = _open_regular(self.meta, os.O_RDONLY)
        except FileNotFoundError:
            return False, None
        except OSError:
            return True, None
        try:
            with os.fdopen(fd, "rb") as f:
                raw = f.read(MAX_META_BYTES + 1)
        except OSError:
            return True, None
        if len(raw) > MAX_META_BYTES:
            return True, None
        try:
            data = json.loads(raw.decode("utf-8"))
            info = PartInfo(str(data["path"]), str(data["version"]), int(data["size"]))
        except (ValueError, KeyError, TypeError):
            return True, None
        if info.path != self._name:
            return True, None
        return True, info

    def claim(self) -> None:
        """
        Check what is under our names before anything is asked of the server.

        @raise LocalError: without C{force}, if a sidecar that is not ours,
            or a partial file with no sidecar of ours, is there.
        """
        there, self._info = self._read_meta()
        self._owned = self._info is not None
        self._sidecar_seen = there
        if self._force or self._owned:
            return
        if there:
            raise LocalError(
                f"{self.meta} was not left by filecache-client (remove it, or use --force)"
            )
        if os.path.lexists(self.part):
            raise LocalError(
                f"{self.part} was not left by filecache-client (remove it, or use --force)"
            )

    def resumable(self) -> PartInfo | None:
        """The sidecar's record, if the partial file is ours and can be resumed."""
        info = self._info if self._owned else None
        if info is None:
            return None
        try:
            have = os.lstat(self.part)
        except OSError:
            return None
        if not stat.S_ISREG(have.st_mode) or have.st_size > info.size:
            return None
        return info

    def have(self) -> int:
        return os.lstat(self.part).st_size if _is_regular(self.part) else 0

    def prepare(self, offset: int, version: str | None) -> None:
        """The next body starts at C{offset}, and must be of C{version} if given."""
        self._offset = offset
        self._expect_version = version

    # BodySink

    def begin(self, size: int, version: str) -> None:
        if self._expect_version is not None and version != self._expect_version:
            raise VersionChanged(f"{self._name} changed on the server")
        if not self._offset and size <= SMALL_BODY:
            self._held, self._held_info = bytearray(), PartInfo(self._name, version, size)
            self._progress.start(self._name, size, 0)
            return
        try:
            if self._offset:
                fd = _open_regular(self.part, os.O_WRONLY)
            else:
                if not self._owned and self._force:
                    # Someone else's entry under our name, replaced as --force says.
                    self._unlink_foreign()
                self._write_meta(PartInfo(self._name, version, size))
                fresh = os.O_TRUNC if os.path.lexists(self.part) else os.O_EXCL
                fd = _open_regular(self.part, os.O_WRONLY | os.O_CREAT | fresh)
        except OSError as e:
            raise LocalError(f"cannot write {self.part}: {e.strerror}") from None
        self._file = os.fdopen(fd, "wb")
        if self._offset:
            self._file.seek(self._offset)
            self._file.truncate()
        self._progress.start(self._name, self._offset + size, self._offset)

    def _unlink_foreign(self) -> None:
        try:
            if not os.path.isdir(self.part) or os.path.islink(self.part):
                os.unlink(self.part)
        except FileNotFoundError:
            pass

    def _write_meta(self, info: PartInfo) -> None:
        folder, name = os.path.split(self.meta)
        try:
            fd, temporary = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=folder or ".")
        except OSError as e:
            raise LocalError(f"cannot write {self.meta}: {e.strerror}") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"path": info.path, "version": info.version, "size": info.size}, f)
            os.replace(temporary, self.meta)
        except OSError as e:
            self._remove(temporary)
            raise LocalError(f"cannot write {self.meta}: {e.strerror}") from None
        self._owned = True
        self._info = info

    def write(self, data: bytes) -> None:
        if self._held is not None:
            self._held += data
            self._progress.advance(len(data))
            return
        assert self._file is not None
        try:
            self._file.write(data)
        except OSError as e:
            raise LocalError(f"cannot write {self.part}: {e.strerror}") from None
        self._progress.advance(len(data))

    # Endings

    def _close(self) -> None:
        self._progress.close()
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.close()
            except OSError:
                pass

    def digest(self) -> str:
        """SHA-256 of the whole partial file as it is on disk."""
        hasher = hashlib.sha256()
        try:
            fd = _open_regular(self.part, os.O_RDONLY)
            with os.fdopen(fd, "rb") as f:
                while chunk := f.read(1 << 20):
                    hasher.update(chunk)
        except OSError as e:
            raise LocalError(f"cannot read {self.part}: {e.strerror}") from None
        return hasher.hexdigest()

    def commit(self) -> None:
        """
        The whole file was verified: move it to its final name.  Without
        C{force} an existing final name is never replaced, even one that
        appeared during the download (the partial file is kept then).
        """
        self._close()
        held = self._held_info
        if held is not None:
            try:
                self._write_held()
            except LocalError:
                self.discard()
                raise
        try:
            if self._force or self._replacing is not None and self._still_replacing():
                os.replace(self.part, self.final)
            else:
                self._move_without_replacing()
        except FileExistsError:
            if held is not None:
                # Kept as any verified partial file is: with its sidecar, for `get --force`.
                self._write_meta(held)
            raise LocalError(f"{self.final} exists (use --force to overwrite)") from None
        except OSError as e:
            raise LocalError(f"cannot rename {self.part}: {e.strerror}") from None
        if self._owned or self._sidecar_seen:
            # Else no sidecar was there, and none of ours since: none to remove.
            self._remove(self.meta)

    def _still_replacing(self) -> bool:
        """Whether the final name holds what it held when it was found outdated (or nothing)."""
        try:
            st = os.lstat(self.final)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return stamp_of(st) == self._replacing

    def _move_without_replacing(self) -> None:
        try:
            os.link(self.part, self.final, follow_symlinks=False)
        except FileExistsError:
            raise
        except OSError:
            # No hard links here (some file systems): check, then rename.
            if os.path.lexists(self.final):
                raise FileExistsError(errno.EEXIST, "exists", self.final) from None
            os.replace(self.part, self.final)
            return
        self._remove(self.part)

    def _write_held(self) -> None:
        """Write the small body held in memory to the partial file, whole."""
        held, self._held, self._held_info = self._held, None, None
        assert held is not None
        try:
            if self._owned or self._force:
                if not self._owned:
                    self._unlink_foreign()
                fresh = os.O_TRUNC if os.path.lexists(self.part) else os.O_EXCL
                fd = _open_regular(self.part, os.O_WRONLY | os.O_CREAT | fresh)
            else:
                # claim found neither a partial file nor a sidecar, and
                # O_EXCL makes sure the name is still free.  What it makes
                # (with O_NOFOLLOW) is a new regular file: no fstat needed.
                fresh = os.O_EXCL
                fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NO_SURPRISES, 0o644)
        except FileExistsError:
            raise LocalError(f"{self.part} was not left by filecache-client (remove it, or use --force)") from None
        except OSError as e:
            raise LocalError(f"cannot write {self.part}: {e.strerror}") from None
        try:
            try:
                # os.write, not a file object: no fstat, ioctl and lseek per small file.
                view = memoryview(held)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except OSError as e:
            if fresh == os.O_EXCL and not self._owned:
                self._remove(self.part)  # made just now, and with no sidecar it would look foreign
            raise LocalError(f"cannot write {self.part}: {e.strerror}") from None

    def keep(self) -> None:
        """
        The transfer broke off: close, leaving the partial file and its
        sidecar.  A small body held in memory is written out first, as the
        partial file it would otherwise have been (if any of it came).
        """
        held = self._held_info
        if held is not None and self._held:
            try:
                self._write_meta(held)
                self._write_held()
            except LocalError:
                pass  # nothing kept: the next attempt starts over
        self._held = self._held_info = None
        self._close()

    def discard(self) -> None:
        """The bytes are bad or the file is gone: remove what we wrote, nothing else."""
        self._held = self._held_info = None
        self._close()
        if self._owned:
            if _is_regular(self.part):
                # Only a regular file can be one we wrote; a FIFO or a
                # symlink put in its place is left where it is.
                self._remove(self.part)
            self._remove(self.meta)
            self._owned = False
            self._info = None

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass
