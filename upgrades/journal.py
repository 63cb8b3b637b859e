"""The bookkeeping of an upgrade run: its journal (the way back) and its recorded steps.

The journal lives in a local file and the run's `result` (operations.journal) and is written BEFORE each
change, so a worker killed at any point leaves exactly what the reaper's on_abandon hook needs to put the
customer back. A step row written while a rollback goes on without the control database is replayed at
reconciliation (`replay_step`). It never holds
a secret: databases are named by connection name, .env files by path and sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import os

from django.utils import timezone
from django.utils.dateparse import parse_datetime

from operations.context import RunContext
from operations.journal import RunJournal

from .models import Upgrade, UpgradeStep

DETAIL_LIMIT = 20000


class Journal(RunJournal):
    """One list of steps inside the run's result document (`doc[key]`); dbswap's journal interface."""


class StepLog:
    """What a step says: to the run's log at once, and to the step's detail."""

    def __init__(self, ctx: RunContext, row: UpgradeStep):
        self.ctx, self.row = ctx, row
        self.lines: list[str] = []

    def _keep(self, text: str) -> None:
        self.lines.append(text)
        size = sum(len(x) + 1 for x in self.lines)
        while size > DETAIL_LIMIT and len(self.lines) > 1:
            size -= len(self.lines.pop(0)) + 1

    def info(self, text: str) -> None:
        self._keep(text)
        self.ctx.info(text)

    def warning(self, text: str) -> None:
        self._keep(f"warning: {text}")
        self.ctx.warning(text)

    def command(self, argv, *, cwd=None, env=None, timeout=None, secrets=(), check=True, identity=None):
        """ctx.command (every line to the run log as it comes, run as `identity`); the step keeps the command
        and its tail."""
        shown = " ".join(argv)
        try:
            res = self.ctx.command(argv, cwd=cwd, env=env, timeout=timeout, secrets=secrets, check=check,
                                   identity=identity)
        except Exception as exc:
            self._keep(f"$ {shown}\n{exc}")
            raise
        tail = [*res.stdout_tail, *res.stderr_tail][-20:]
        self._keep("\n".join([f"$ {' '.join(res.argv)}", *tail, f"exit code {res.exit_code}"]))
        return res


class Steps:
    """UpgradeStep rows: one per step, with status and times, written as the step starts and ends."""

    def __init__(self, ctx: RunContext, upgrade):
        self.ctx, self.upgrade = ctx, upgrade
        self.position = UpgradeStep.objects.filter(upgrade=upgrade).count()
        self.failed = ""  # the first step that failed

    def _row(self, name: str, status: str, **fields) -> UpgradeStep:
        self.position += 1
        row = UpgradeStep(upgrade=self.upgrade, position=self.position, name=name, status=status, **fields)
        self._record(row, row.save)
        return row

    def _record(self, row: UpgradeStep, write) -> None:
        """Now, or — in a rollback that goes on without the control database — at reconciliation (replay_step)."""
        self.ctx.record(write, replay="upgrade_step", position=row.position, name=row.name, status=row.status,
                        started_at=row.started_at.isoformat(),
                        finished_at=row.finished_at.isoformat() if row.finished_at else None, detail=row.detail)

    @contextlib.contextmanager
    def step(self, name: str):
        self.ctx.check_alive()  # a cancel request or a lost run stops the upgrade between steps
        self.ctx.phase(name)  # each step is a named phase of the run's progress bar
        row = self._row(name, UpgradeStep.Status.RUNNING)
        self.ctx.info(f"— {name}")
        log = StepLog(self.ctx, row)
        try:
            yield log
        except BaseException as exc:
            self.failed = self.failed or name
            log._keep(f"failed: {exc}")
            self._end(row, log, UpgradeStep.Status.FAILED)
            raise
        self._end(row, log, UpgradeStep.Status.SUCCEEDED)

    def skip(self, name: str, why: str) -> None:
        self._row(name, UpgradeStep.Status.SKIPPED, finished_at=timezone.now(), detail=why)
        self.ctx.info(f"— {name}: skipped ({why})")

    def _end(self, row: UpgradeStep, log: StepLog, status: str) -> None:
        row.status, row.finished_at = status, timezone.now()
        row.detail = self.ctx.mask("\n".join(log.lines))[-DETAIL_LIMIT:]
        self._record(row, lambda: UpgradeStep.objects.filter(pk=row.pk).update(
            status=row.status, finished_at=row.finished_at, detail=row.detail) if row.pk else row.save())


def replay_step(run, payload: dict) -> None:
    """Reconciliation of a step recorded offline (operations.reconcile): the row of this run's upgrade only."""
    upgrade = Upgrade.objects.get(run=run)
    when = {k: parse_datetime(payload[k]) if payload.get(k) else None for k in ("started_at", "finished_at")}
    UpgradeStep.objects.update_or_create(
        upgrade=upgrade, position=int(payload["position"]),
        defaults={"name": str(payload["name"])[:40],
                  "status": payload["status"] if payload["status"] in UpgradeStep.Status.values else "failed",
                  "started_at": when["started_at"] or timezone.now(), "finished_at": when["finished_at"],
                  "detail": str(payload.get("detail") or "")})


def uninterruptible(ctx: RunContext):
    """See RunContext.uninterruptible: a rollback runs to its end."""
    return ctx.uninterruptible()


def file_sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except FileNotFoundError:
        return None


def env_fingerprints(paths: list[str]) -> dict[str, str | None]:
    """sha256 of each live .env (None: absent): the rollback proves they are back byte for byte."""
    return {p: file_sha256(os.path.join(p, ".env")) for p in paths}
