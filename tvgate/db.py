"""Opening the database, running numbered migrations, and running queries off the IOLoop.

Peewee is synchronous and keeps one connection per thread. Request handlers
never query on the IOLoop thread: they go through :class:`DatabaseRunner`,
whose thread pool gives each worker thread its own connection. When the
database goes away, a thread's broken connection is closed so that the next
call reconnects instead of failing forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlparse

import peewee
import playhouse.migrate

from tvgate import models

log = logging.getLogger("tvgate.db")
T = TypeVar("T")

#: Errors that mean "the database is not reachable right now", not "bad query".
CONNECTION_ERRORS: tuple[type[Exception], ...] = (peewee.OperationalError, peewee.InterfaceError)


class DatabaseUnavailable(Exception):
    """The database could not be reached; callers answer 503 or spool."""


class SqlWithoutValues(logging.Filter):
    """Keep a query's statement in peewee's debug log, never its values.

    Peewee logs every query at debug as ``(sql, params)``; the params are ciphertexts,
    captured request bodies, token hashes and emails. The statement has placeholders
    only, so it is kept, with the number of values left out.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, tuple) and len(record.msg) == 2:
            sql, params = record.msg
            record.msg = "%s [%d values not logged]"
            record.args = (sql, len(params or ()))
        return True


def _quiet_sql_values() -> None:
    logger = logging.getLogger("peewee")
    if not any(isinstance(f, SqlWithoutValues) for f in logger.filters):
        logger.addFilter(SqlWithoutValues())


def open_database(url: str) -> peewee.Database:
    """Open (lazily) the database at ``url`` and bind the models to it."""
    _quiet_sql_values()
    parsed = urlparse(url)
    db: peewee.Database
    if parsed.scheme == "sqlite":
        path = unquote(url[len("sqlite:///") :])
        if path != ":memory:":
            _make_private(path)
        db = peewee.SqliteDatabase(
            path,
            pragmas={
                # WAL lets the trace writer, the CLI and readers work at once.
                "journal_mode": "wal",
                "synchronous": "normal",
                "busy_timeout": 10000,
                "foreign_keys": 1,
            },
            check_same_thread=False,
            # A deferred transaction that reads and then writes fails at once with "database
            # is locked" when another connection writes; IMMEDIATE waits (busy_timeout).
            lock_type="IMMEDIATE",
        )
    elif parsed.scheme in ("postgresql", "postgres"):
        db = peewee.PostgresqlDatabase(
            unquote(parsed.path.lstrip("/")),
            user=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
            host=parsed.hostname or None,
            port=parsed.port or 5432,
            connect_timeout=5,
        )
    else:
        raise ValueError(f"unsupported database URL scheme {parsed.scheme!r}")
    models.database.initialize(db)
    return db


def _make_private(path: str) -> None:
    """Create the SQLite file 0600 (it holds ciphertexts and captured bodies), and make an
    older one 0600. SQLite gives its -wal and -shm files the database file's mode."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for name in (path, path + "-wal", path + "-shm"):
        try:
            if os.stat(name).st_mode & 0o077:
                os.chmod(name, 0o600)
        except FileNotFoundError:
            continue
        except OSError as exc:  # someone else's file (the CLI run by another user)
            log.warning("cannot make %s private: %s", name, exc.strerror)


def reset_connection(db: peewee.Database) -> None:
    """Drop this thread's connection after a connection error, so the next call reconnects."""
    try:
        if not db.is_closed():
            db.close()
    except Exception:  # noqa: BLE001 - the connection is already broken; nothing to save
        state = getattr(db, "_state", None)
        if state is not None:
            state.reset()


# Tables are created from today's model classes, so a later migration that adds a column
# must tolerate a table that already has it (add_column_if_missing).
def _migration_1(db: peewee.Database) -> None:
    db.create_tables(
        [models.Org, models.User, models.ProviderKey, models.Route, models.ProxyToken, models.Trace]
    )


def _migration_2(db: peewee.Database) -> None:
    db.create_tables([models.WebSession])


def add_column_if_missing(db: peewee.Database, model: type[peewee.Model], name: str) -> None:
    """Add a model's column to an existing table (a fresh table already has it)."""
    table = model._meta.table_name
    if name not in {column.name for column in db.get_columns(table)}:
        migrator = playhouse.migrate.SchemaMigrator.from_database(db)
        playhouse.migrate.migrate(migrator.add_column(table, name, model._meta.fields[name]))


def _migration_4(db: peewee.Database) -> None:
    add_column_if_missing(db, models.ProviderKey, "available_to_all")
    db.create_tables([models.KeyGrant, models.AuditEvent], safe=True)


def _migration_5(db: peewee.Database) -> None:
    for name in ("retention_days", "redaction_patterns"):
        add_column_if_missing(db, models.Org, name)
    for name in (
        "repo",
        "branch",
        "cost_usd",
        "request_blob",
        "response_blob",
        "truncated",
        "written_at",
    ):
        add_column_if_missing(db, models.Trace, name)
    db.execute_sql("CREATE INDEX IF NOT EXISTS trace_written_at ON trace (written_at)")
    db.create_tables([models.Blob, models.ModelPrice, models.SinkState], safe=True)
    from tvgate.traces.pricing import seed_prices

    seed_prices()


def _migration_6(db: peewee.Database) -> None:
    add_column_if_missing(db, models.ProviderKey, "max_concurrent")
    add_column_if_missing(db, models.Route, "fallbacks")
    add_column_if_missing(db, models.Trace, "attempts")
    db.create_tables(
        [models.Budget, models.RateLimit, models.UsageCounter, models.ConcurrencySlot], safe=True
    )


def _migration_7(db: peewee.Database) -> None:
    add_column_if_missing(db, models.Trace, "anomalies")


def _migration_8(db: peewee.Database) -> None:
    # Orgs bound to a JWT issuer's org claim (review finding 16.3): one tvgate org per
    # (issuer, claim value); rows with neither are not bound, and NULLs never collide.
    for name in ("jwt_issuer", "jwt_org"):
        add_column_if_missing(db, models.Org, name)
    db.execute_sql(
        "CREATE UNIQUE INDEX IF NOT EXISTS org_jwt_issuer_jwt_org ON org (jwt_issuer, jwt_org)"
    )


def _migration_9(db: peewee.Database) -> None:
    # Where a token or a web session came from, so it ends when that does (issue 16.4).
    for name in ("visdom_session", "visdom_checked_at"):
        add_column_if_missing(db, models.ProxyToken, name)
    for name in ("via", "token_id", "expires_at", "visdom_session", "visdom_checked_at"):
        add_column_if_missing(db, models.WebSession, name)


def _migration_10(db: peewee.Database) -> None:
    # Prices per org over the default table (issue 16.7): the model's unique index becomes
    # one over the default rows and one over each org's rows.
    add_column_if_missing(db, models.ModelPrice, "org_id")
    db.execute_sql("DROP INDEX IF EXISTS model_price_model")
    db.execute_sql(
        "CREATE UNIQUE INDEX IF NOT EXISTS model_price_default_model"
        " ON model_price (model) WHERE org_id IS NULL"
    )
    db.execute_sql(
        "CREATE UNIQUE INDEX IF NOT EXISTS model_price_org_id_model ON model_price (org_id, model)"
    )


def _migration_11(db: peewee.Database) -> None:
    db.create_tables([models.LoginFailure], safe=True)


def _migration_14(db: peewee.Database) -> None:
    # Budget reservations (tvgate.governance.store.CounterStore.reserve_budget).
    for name in ("closed_limit", "closed_need"):
        add_column_if_missing(db, models.UsageCounter, name)
    db.create_tables([models.BudgetHold], safe=True)


#: Numbered migrations, applied in order, each once. Append; never edit a released one.
MIGRATIONS: list[tuple[int, Callable[[peewee.Database], None]]] = [
    (1, _migration_1),
    (2, _migration_2),
    (4, _migration_4),
    (5, _migration_5),
    (6, _migration_6),
    (7, _migration_7),
    (8, _migration_8),
    (9, _migration_9),
    (10, _migration_10),
    (11, _migration_11),
    (14, _migration_14),
]


def migrate(db: peewee.Database) -> list[int]:
    """Apply the migrations this database has not seen; returns the versions applied."""
    applied: list[int] = []
    with db.connection_context():
        db.create_tables([models.SchemaVersion], safe=True)
        done = {row.version for row in models.SchemaVersion.select()}
        for version, step in MIGRATIONS:
            if version in done:
                continue
            with db.atomic():
                step(db)
                models.SchemaVersion.create(version=version)
            applied.append(version)
            log.info("applied migration %d", version)
    return applied


class DatabaseRunner:
    """Runs synchronous Peewee work in a thread pool, one connection per thread."""

    def __init__(self, db: peewee.Database, threads: int = 0) -> None:
        self.db = db
        self.executor = ThreadPoolExecutor(
            max_workers=threads or min(16, (os.cpu_count() or 2) * 4),
            thread_name_prefix="tvgate-db",
        )

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except CONNECTION_ERRORS as exc:
            reset_connection(self.db)
            raise DatabaseUnavailable(
                str(exc).splitlines()[0] if str(exc) else "unavailable"
            ) from exc

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the pool; connection failures become DatabaseUnavailable."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._call, fn)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
