"""
`get`: what the NAMEs ask for, brought over on parallel lanes, each file
skipped if up to date, then --delete; the Reporter says how it went.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import IO, Any

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectError

from filecache import wire
from filecache.client.arguments import Invocation
from filecache.client.destination import Folders, destination, remove_empty_folders
from filecache.client.display import FETCHED, SKIPPED
from filecache.client.download import Session, ask, fetch
from filecache.client.errors import (
    BrokenReply,
    ConnectionLostEarly,
    LocalError,
    NoMatch,
    ServerError,
)
from filecache.client.interrupt import Interrupted, Stop
from filecache.client.lanes import Job, Lane, Lanes
from filecache.client.localdigests import LocalDigests, RunBlocking, stamp_of
from filecache.client.protocol import FileCacheClientProtocol
from filecache.client.pruning import find_extras, remove_extras
from filecache.client.readers import FileHash
from filecache.client.reporter import FIRST, LAST, Key, Reporter
from filecache.client.retrying import Retrying
from filecache.client.selection import Wanted, folder_rows, select
from filecache.client.uptodate import Local, compare

Dial = Callable[[], Awaitable[FileCacheClientProtocol]]

_GIVE_UP = (ConnectionLostEarly, ConnectError)
"""Failures past the retries that mean the server is out of reach: no more files are started."""


class Mirror:
    """One `get` of any number of NAMEs into C{inv.folder}."""

    def __init__(
        self,
        reactor: Any,
        inv: Invocation,
        out: IO[str],
        err: IO[str],
        stop: Stop,
        dial: Dial,
        run_blocking: RunBlocking,
    ) -> None:
        self._reactor = reactor
        self._inv = inv
        self._stop = stop
        self.report = Reporter(inv, out, err, reactor)
        self.lanes = Lanes([Lane(n, Session(dial)) for n in range(inv.parallel)], self._work)
        self.digests = LocalDigests(inv.folder, run_blocking)
        self._folders = Folders()
        self._keys: dict[Job, Key] = {}
        self._missing: list[Job] = []
        self._wanted: list[Wanted] = []
        self._upfront = False
        """Whether the NAMEs were matched against a listing first (patterns, folders, --delete)."""
        self._mirrored = False
        """Whether a folder or a pattern is mirrored (so its digests are worth keeping)."""

    # The run

    async def run(self) -> int:
        """Carry the get out; return its exit status.  Interrupted says what is left."""
        self.digests.load()
        try:
            return await self._run()
        finally:
            self.report.close()
            remove_empty_folders(self._folders.made)
            if self._mirrored and not self._inv.dry_run:
                # A mirror's state, for its re-runs; files named one by one
                # leave nothing beside them.
                self.digests.save()
            for lane in self.lanes.lanes:
                await lane.session.close()

    async def _run(self) -> int:
        inv = self._inv
        self._wanted = [Wanted(name, inv.recursive) for name in inv.names]
        self._upfront = inv.delete or any(not want.plain for want in self._wanted)
        server: set[str] | None = None
        try:
            if self._upfront:
                rows = await self._listing()
                server = {row.path for row in rows}
                chosen = select(self._wanted, rows)
                self._wanted = chosen.wanted
                for want in chosen.unmatched:
                    self.report.fail(FIRST, NoMatch(want.text))
                jobs = [Job(row.path, row.size) for row in chosen.rows]
                self._mirrored = True
                self.report.show(multi=True)
            else:
                jobs = [Job(name) for name in dict.fromkeys(inv.names)]
                self.report.show(multi=len(jobs) > 1)
            await self._phase(jobs, [(n, 0) for n in range(len(jobs))])
            if self._missing:
                await self._look_in_folders()
            if self.lanes.not_started:
                self.report.out_of_reach(self.lanes.not_started)
            deleted = None
            if inv.delete and server is not None and not self.lanes.halted:
                deleted = self._prune(server)
        except CancelledError:
            if self._stop.signum is None:
                raise
            under_way = sorted(self.lanes.under_way, key=lambda job: self._keys[job])
            lines = self.report.unfinished(under_way + self.lanes.not_started, bare=not self._upfront)
            raise Interrupted(self._stop.signum, lines) from None
        self.report.summary(deleted)
        return self.report.status()

    async def _phase(self, jobs: Sequence[Job], keys: Sequence[Key]) -> None:
        for job, key in zip(jobs, keys):
            self._keys[job] = key
        tally = self.report.tally
        tally.files += len(jobs)
        tally.size += sum(job.size or 0 for job in jobs)
        if jobs:
            await self.lanes.run(jobs)

    async def _listing(self) -> list[wire.ListRow]:
        rows: list[wire.ListRow] = await ask(
            self.lanes.lanes[0].session, lambda client: client.list(), "the listing", self._retrying(None)
        )
        return rows

    def _retrying(self, lane: Lane | None) -> Retrying:
        """How a request on C{lane} (or the listing's) is retried."""
        return Retrying(
            self._reactor,
            self._inv.retries,
            lambda name, error, delay: self.report.retrying(lane, name, error, delay),
            lambda: self._stop.requested,
        )

    async def _look_in_folders(self) -> None:
        """Bare NAMEs the server has no file by: folders, if the listing says so."""
        missing, self._missing = self._missing, []
        rows: list[wire.ListRow] = []
        if not self.lanes.halted:  # else the server is out of reach: they are not found
            try:
                rows = await self._listing()
            except (ServerError, BrokenReply):
                pass
        found: list[Job] = []
        keys: list[Key] = []
        for job in missing:
            tree = folder_rows(job.path, rows)
            if not tree:
                self.report.fail(self._keys[job], ServerError(wire.NOT_FOUND, "no such file"), job)
                continue
            self.report.tally.files -= 1  # the tree takes the bare NAME's place
            found += [Job(row.path, row.size) for row in tree]
            keys += [(self._keys[job][0], n + 1) for n in range(len(tree))]
        if found:
            self._mirrored = True
            if not self.report.multi:
                self.report.show(multi=True)
            await self._phase(found, keys)

    def _prune(self, server: set[str]) -> int:
        """--delete: remove (or, dry, list) what the server no longer has; return how many."""
        folder = self._inv.folder
        extras = find_extras(folder, self._wanted, server)
        if self._inv.dry_run:
            for extra in extras:
                self.report.would_delete(destination(folder, extra.rel))
            return len(extras)
        removed, problems = remove_extras(folder, extras)
        for extra in removed:
            self.digests.forget(extra.rel)
            self.report.deleted(extra.rel)
        for problem in problems:
            self.report.fail(LAST, problem)
        return len(removed)

    # One file

    async def _work(self, job: Job, lane: Lane) -> None:
        inv = self._inv
        try:
            final = destination(inv.folder, job.path)
            verdict, st = await compare(
                final, job.path, job.size, lambda: self._hash(job, lane), self.digests, inv.force
            )
            if verdict is Local.SAME:
                assert st is not None
                self.report.end(job, SKIPPED, st.st_size, final)
                return
            if inv.dry_run:
                await self._would_fetch(job, lane, final, verdict)
                return
            saved, result = await fetch(
                lane.session,
                job.path,
                inv.folder,
                retrying=self._retrying(lane),
                force=inv.force,
                replacing=stamp_of(st) if verdict is Local.OUTDATED and st is not None else None,
                progress=lambda: self.report.progress(job, lane),
                folders=self._folders,
                absent=verdict is Local.ABSENT,
            )
            self.digests.remember(job.path, saved, result.digest)
            self.report.end(job, FETCHED, result.size, saved)
        except ServerError as e:
            self._stopping_check()
            if e.code == wire.NOT_FOUND and not self._upfront and self._keys[job][1] == 0:
                # Maybe a folder: _look_in_folders says.
                self._missing.append(job)
                return
            self.report.fail(self._keys[job], e, job)
        except (LocalError, BrokenReply) as e:
            self._stopping_check()
            self.report.fail(self._keys[job], e, job)
        except _GIVE_UP as e:
            self._stopping_check()
            self.report.fail(self._keys[job], e, job)
            self.lanes.halt()

    def _stopping_check(self) -> None:
        """Once a signal stopped the get, what fails now failed because of it: not a file's error."""
        if self._stop.requested:
            raise CancelledError()

    async def _hash(self, job: Job, lane: Lane) -> FileHash:
        found: FileHash = await ask(
            lane.session, lambda client: client.hash(job.path), job.path, self._retrying(lane)
        )
        return found

    async def _would_fetch(self, job: Job, lane: Lane, final: str, verdict: Local) -> None:
        size = job.size
        if size is None:
            # A bare NAME: make sure the server has it, and learn its size.
            size = (await self._hash(job, lane)).size
            self.report.tally.size += size
        what = {Local.DIFFERENT: "would replace", Local.OUTDATED: "would update"}.get(verdict, "would fetch")
        self.report.would(job, what, final, size)
        self.report.tally.end(FETCHED, size)
