"""Opening the database, running numbered migrations, and running queries off the IOLoop.

Peewee is synchronous and keeps one connection per thread. Request handlers
never query on the IOLoop thread: they go through :class:`DatabaseRunner`,
whose thread pool gives each worker thread its own connection. When the
database goes away, a thread's broken connection is closed so that the next
call reconnects instead of failing forever.

A connection is closed between two uses once it has gone unused for
``idle_timeout`` or is ``max_age`` old (:class:`ConnectionAge`; the runner's
closer thread does it for the pool's threads): PostgreSQL's smart shutdown
waits for every session to end, and a connection per pool thread held for the
life of the process would keep it waiting for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
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
K = TypeVar("K")

#: Errors that mean "the database is not reachable right now", not "bad query".
CONNECTION_ERRORS: tuple[type[Exception], ...] = (peewee.OperationalError, peewee.InterfaceError)


class DatabaseUnavailable(Exception):
    """The database could not be reached; callers answer 503 or spool."""


class DatabaseMissing(Exception):
    """There is no SQLite file at the path, and the caller may not create one."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


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


def open_database(url: str, *, create: bool = True) -> peewee.Database:
    """Open (lazily) the database at ``url`` and bind the models to it.

    Without ``create``, a SQLite file that does not exist is :class:`DatabaseMissing`:
    a management command run with the wrong data directory would otherwise work on a
    new, empty database of its own and look as if the real one had lost its data.
    """
    _quiet_sql_values()
    parsed = urlparse(url)
    db: peewee.Database
    if parsed.scheme == "sqlite":
        path = unquote(url[len("sqlite:///") :])
        if path != ":memory:":
            if not create and not os.path.exists(path):
                raise DatabaseMissing(path)
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


def _migration_3(db: peewee.Database) -> None:
    # Translation between provider APIs, on unless a route turns it off (issue 19).
    add_column_if_missing(db, models.Route, "translate")


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


def _migration_12(db: peewee.Database) -> None:
    # A call's span in the org's observability stack (issue 24): the client's traceparent,
    # why the answer ended, the provider's host; the org's switch for content in spans.
    for name in ("traceparent", "finish_reason", "server_address"):
        add_column_if_missing(db, models.Trace, name)
    add_column_if_missing(db, models.Org, "span_content")


def _migration_13(db: peewee.Database) -> None:
    # Changes announced to every process (tvgate.services.events).
    db.create_tables([models.OrgChange], safe=True)


def _migration_14(db: peewee.Database) -> None:
    # Budget reservations (tvgate.governance.store.CounterStore.reserve_budget).
    for name in ("closed_limit", "closed_need"):
        add_column_if_missing(db, models.UsageCounter, name)
    db.create_tables([models.BudgetHold], safe=True)


def _migration_15(db: peewee.Database) -> None:
    # A key on a Chat Completions-only upstream (vLLM, Ollama), issue 19.
    add_column_if_missing(db, models.ProviderKey, "chat_only")


def _migration_16(db: peewee.Database) -> None:
    # Traces pushed to Visdom Trace per org (issue 18): its settings and cursor, the
    # sessions' state and the outbox.
    db.create_tables([models.VisdomSink, models.VisdomSession, models.VisdomEvent], safe=True)


def _migration_17(db: peewee.Database) -> None:
    # Visdom Trace events pushed with their user's own credential (issue 18): the users'
    # sealed credentials, whose each event and session is, and the counts by credential.
    db.create_tables([models.VisdomCredential], safe=True)
    add_column_if_missing(db, models.VisdomEvent, "user_id")
    add_column_if_missing(db, models.VisdomSession, "user_id")
    for name in ("sent_user", "sent_org"):
        add_column_if_missing(db, models.VisdomSink, name)


def _migration_18(db: peewee.Database) -> None:
    # The non-secret settings of a cloud key (Bedrock, Vertex AI, Azure OpenAI), issue 20.
    add_column_if_missing(db, models.ProviderKey, "settings")


def _migration_19(db: peewee.Database) -> None:
    # A minted token waits sealed in its web session for the page after the redirect.
    add_column_if_missing(db, models.WebSession, "flash")


def _migration_20(db: peewee.Database) -> None:
    # Claude Code's agent and parent agent per call: a session as a tree of agents (issue 21).
    for name in ("agent_id", "parent_agent_id"):
        add_column_if_missing(db, models.Trace, name)


def _migration_21(db: peewee.Database) -> None:
    # Claude subscriptions passed through (issue 21.1): the org's switch, the trace's mark,
    # and an index of the marked traces alone for the users list's count and last use.
    add_column_if_missing(db, models.Org, "subscription_passthrough")
    add_column_if_missing(db, models.Trace, "client_credential")
    db.execute_sql(
        "CREATE INDEX IF NOT EXISTS trace_subscription_use ON trace (org_id, user_id, received_at)"
        f" WHERE client_credential = '{models.CLIENT_SUBSCRIPTION}'"
    )


def _migration_22(db: peewee.Database) -> None:
    # Codex's Responses API over WebSocket (issue 21.2): how the client called.
    add_column_if_missing(db, models.Trace, "transport")


def _migration_24(db: peewee.Database) -> None:
    # Visdom Trace reads a session's calls in order (issue 18): each trace writer's watermark.
    db.create_tables([models.WriterWatermark], safe=True)


#: Numbered migrations, applied in order, each once. Append; never edit a released one.
#: The numbers have gaps: 13 came after 14 and 19, 3 and 12 after all of them, 15 and 18
#: after 19, 16 after 18, 17 after 22 (a database that has the later ones gets them). The
#: gaps stay: a database records the numbers it has applied, and renumbering would run a
#: migration twice or skip it.
MIGRATIONS: list[tuple[int, Callable[[peewee.Database], None]]] = [
    (1, _migration_1),
    (2, _migration_2),
    (3, _migration_3),
    (4, _migration_4),
    (5, _migration_5),
    (6, _migration_6),
    (7, _migration_7),
    (8, _migration_8),
    (9, _migration_9),
    (10, _migration_10),
    (11, _migration_11),
    (12, _migration_12),
    (13, _migration_13),
    (14, _migration_14),
    (15, _migration_15),
    (16, _migration_16),
    (17, _migration_17),
    (18, _migration_18),
    (19, _migration_19),
    (20, _migration_20),
    (21, _migration_21),
    (22, _migration_22),
    (24, _migration_24),
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
    if applied:
        # One line for a run, not one per step: a fresh database gets every migration.
        log.info("applied migrations %s", ", ".join(map(str, applied)))
    return applied


#: Defaults of ``db_idle_timeout`` and ``db_max_age`` (tvgate.config), in seconds.
IDLE_TIMEOUT = 60.0
MAX_AGE = 600.0


def current_connection(db: peewee.Database) -> object | None:
    """This thread's open connection of ``db``, or None."""
    return db._state.conn  # type: ignore[attr-defined]  # peewee's per-thread state


class ConnectionAge:
    """When one thread's connection was opened and last used, and whether it is due to be
    closed: unused for ``idle_timeout``, or ``max_age`` old."""

    __slots__ = ("conn", "idle_timeout", "max_age", "opened", "used")

    def __init__(self, idle_timeout: float, max_age: float) -> None:
        self.idle_timeout = idle_timeout
        self.max_age = max_age
        self.conn: object | None = None
        self.opened = 0.0
        self.used = 0.0

    def note_use(self, conn: object | None, *, keeps_alive: bool = True) -> None:
        """The thread just used its connection ``conn`` (None: it has none now). A use that
        does not ``keeps_alive`` (a poll made every second whatever the traffic) leaves an
        open connection's idle time running, so an idle gateway still lets its connections
        go (PostgreSQL's smart shutdown waits for them); a connection it opened lives for
        ``idle_timeout``, as any."""
        now = time.monotonic()
        if conn is not self.conn:
            self.conn = conn
            self.opened = now
        elif not keeps_alive:
            return
        self.used = now

    def due(self, now: float) -> bool:
        return self.conn is not None and (
            now - self.used >= self.idle_timeout or now - self.opened >= self.max_age
        )


def close_own_connection_if_due(db: peewee.Database, age: ConnectionAge) -> None:
    """In the thread that owns it: close this thread's connection if it is due."""
    conn = current_connection(db)
    if conn is not age.conn:
        age.note_use(conn)  # opened by a use this thread did not report
    if age.due(time.monotonic()):
        reset_connection(db)
        age.note_use(None)


class _PooledConnection:
    """A pool thread's connection, as the closer thread sees it. ``lock`` is held while the
    thread uses it, so the closer never closes a connection in use."""

    __slots__ = ("age", "closed_by_closer", "lock")

    def __init__(self, idle_timeout: float, max_age: float) -> None:
        self.lock = threading.Lock()
        self.age = ConnectionAge(idle_timeout, max_age)
        self.closed_by_closer = False


def finished_read(reading: dict[K, asyncio.Future[T]], key: K, done: asyncio.Future[T]) -> T | None:
    """A database read shared by concurrent callers (``reading[key]``, from
    ``DatabaseRunner.run``) has finished: no longer in flight; its result, or None when it
    failed (its callers see the error where they await it)."""
    if reading.get(key) is done:
        del reading[key]
    if done.cancelled() or done.exception() is not None:
        return None
    return done.result()


class DatabaseRunner:
    """Runs synchronous Peewee work in a thread pool, one connection per thread; a closer
    thread closes the connections that are due (:class:`ConnectionAge`)."""

    def __init__(
        self,
        db: peewee.Database,
        threads: int = 0,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        max_age: float = MAX_AGE,
    ) -> None:
        self.db = db
        self.executor = ThreadPoolExecutor(
            max_workers=threads or min(16, (os.cpu_count() or 2) * 4),
            thread_name_prefix="tvgate-db",
        )
        self.idle_timeout = idle_timeout
        self.max_age = max_age
        self._connections: dict[int, _PooledConnection] = {}
        self._local = threading.local()
        self._stopping = threading.Event()
        self._closer = threading.Thread(
            target=self._close_due, name="tvgate-db-closer", daemon=True
        )
        self._closer.start()

    def _own(self) -> _PooledConnection:
        own: _PooledConnection | None = getattr(self._local, "connection", None)
        if own is None:
            own = self._local.connection = _PooledConnection(self.idle_timeout, self.max_age)
            self._connections[threading.get_ident()] = own
        return own

    def _call(self, fn: Callable[[], T], keeps_alive: bool = True) -> T:
        own = self._own()
        with own.lock:
            if own.closed_by_closer:
                # Peewee's state of this thread still names the closed connection.
                self.db._state.reset()  # type: ignore[attr-defined]
                own.closed_by_closer = False
            try:
                return fn()
            except CONNECTION_ERRORS as exc:
                reset_connection(self.db)
                raise DatabaseUnavailable(
                    str(exc).splitlines()[0] if str(exc) else "unavailable"
                ) from exc
            finally:
                own.age.note_use(current_connection(self.db), keeps_alive=keeps_alive)

    def _close_due(self) -> None:
        """The closer thread: every so often, close the pool's connections that are due.

        A connection is closed from this thread, not its own, which may be waiting for
        work for hours; its own thread forgets it at its next use (``closed_by_closer``).
        """
        period = max(0.05, min(self.idle_timeout, self.max_age) / 4)
        while not self._stopping.wait(period):
            now = time.monotonic()
            for own in list(self._connections.values()):
                if not own.age.due(now) or not own.lock.acquire(blocking=False):
                    continue  # in use right now: its thread notes the use when done
                try:
                    conn = own.age.conn
                    if own.age.due(now) and conn is not None:
                        with contextlib.suppress(Exception):  # broken already: gone either way
                            conn.close()  # type: ignore[attr-defined]
                        own.age.note_use(None)
                        own.closed_by_closer = True
                finally:
                    own.lock.release()

    async def run(self, fn: Callable[[], T], *, keeps_alive: bool = True) -> T:
        """Run ``fn`` in the pool; connection failures become DatabaseUnavailable. With
        ``keeps_alive`` False the use does not count against the idle timeout
        (:meth:`ConnectionAge.note_use`)."""
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, self._call, fn, keeps_alive
        )

    def close(self) -> None:
        self._stopping.set()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self._closer.join()
