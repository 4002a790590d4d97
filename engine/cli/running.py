"""`stepline dev`, `stepline worker` and `stepline serve`: the long-running processes."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from stepline.cli._common import CliError, _dev_query_db, _fail, _load_app, _run, _say, err
from stepline.cli.options import (
    AppOpt,
    ConcurrencyOpt,
    GraceOpt,
    JsonLogsOpt,
    LogOpt,
    ProcessesOpt,
    _setting,
    _setting_help,
)
from stepline.cli.shutdown import Stop, drain, parse_grace, start_unless_stopped
from stepline.client import Client
from stepline.errors import SteplineError, UnknownPool
from stepline.log import DEFAULT_LOG_URL
from stepline.log.topics import DEFAULT_POOL, Topics, check_pool
from stepline.projections.query_store import DEFAULT_QUERY_DB
from stepline.runtime.worker import Worker
from stepline.sdk.logs import configure_logging
from stepline.sdk.task import Registry
from stepline.security.sensitive import redact_text
from stepline.settings import DEFAULT_MAX_BODY_BYTES, DEFAULT_SHUTDOWN_GRACE, SettingsError, load_settings

if TYPE_CHECKING:
    from stepline.server import ServeConfig, WebhookSource
    from stepline.server.probes import WorkerProbes


def _settle_gc() -> None:
    """Shorter, rarer pauses of the cyclic garbage collector, in a worker
    process of ours (a library embedded in an app leaves the app's GC alone).

    A full collection stops the event loop for as long as it scans every
    tracked object: ~17 ms for what the imports and the start leave, and
    40-100 ms with 10,000 sleeping runs, every few seconds under load; each
    such pause delays every timer due meanwhile (bench/README.md, g_sleeping).
    Freezing what exists once the worker has started takes the modules,
    classes and schemas out of every later scan (they live as long as the
    process). A larger first generation lets the many objects of a run's
    few milliseconds die by reference count before a collection could
    promote them, so the older generations fill, and get scanned, less often.
    """
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD0, *gc.get_threshold()[1:])


# Objects allocated (net) between two collections of the first generation;
# Python's default is 700.
GC_THRESHOLD0 = 20_000


async def _serve_worker(registry: Registry, log_url: str, concurrency: int, grace: float,
                        http: tuple[str, int] | None = None, pool: str = DEFAULT_POOL,
                        json_logs: bool = False, instance_id: str | None = None,
                        member: tuple[int, int] | None = None) -> None:
    # The log's writer and reader threads hand results back to the event
    # loop; with CPython's default 5 ms switch interval each hand-off can
    # wait that long for the GIL while the loop is busy. This process is
    # ours, so shorten it (a library embedded in an app leaves it alone).
    sys.setswitchinterval(0.0005)
    stop = Stop.on_signals(json_logs)  # the first signal drains (engine/cli/shutdown.py), a second cancels
    # Bound before the log is opened: a port in use fails at once, and the
    # probes answer (alive, not ready) while the worker still joins.
    topics = Topics(pool=pool)
    async with _worker_http(http, json_logs) as probes, Client(log_url, registry=registry, topics=topics) as client:
        if member is not None:  # one of `stepline worker --processes N`'s children (engine/cli/supervise.py)
            client.log.split_groups(*member)
        worker = Worker(registry, client.log, concurrency=concurrency, topics=client.topics, client=client,
                        instance_id=instance_id)
        if probes is not None:
            probes.attach(worker)
        if not await start_unless_stopped(worker, stop):
            return
        _settle_gc()
        try:
            ids = sorted(t.id for t in registry if t.pool == pool)
            _say(
                f"stepline worker {worker.worker_id} on {redact_text(log_url)}, pool {pool}: "
                f"{len(ids)} task(s): {', '.join(ids)}; partitions {sorted(worker.owned)}",
                json_logs, worker_id=worker.worker_id, log=redact_text(log_url), pool=pool, tasks=ids,
                partitions=sorted(worker.owned),
            )
            await stop.requested.wait()
            await drain(worker, grace, stop)
        finally:
            await worker.close()


@asynccontextmanager
async def _worker_http(http: tuple[str, int] | None, json_logs: bool = False) -> AsyncIterator[WorkerProbes | None]:
    """The worker's /healthz, /readyz and /metrics (engine/server/probes.py), when asked for."""
    if http is None:
        yield None
        return
    from stepline.server.probes import WorkerProbes  # start-up: only with --http-port

    host, port = http
    try:
        probes = WorkerProbes(host, port)
    except OSError as exc:
        raise CliError(f"cannot listen on {host}:{port} (--http-port): {exc.strerror or exc}; "
                       "pick another port, or 0 for a free one") from None
    async with probes:
        _say(f"stepline worker: /healthz, /readyz and /metrics on {probes.address}", json_logs,
                  address=probes.address)
        yield probes


def _http_port(value: str | int | None) -> int | None:
    """--http-port as a number; a bad one is one clear error."""
    if value is None or value == "":
        return None
    text = str(value).strip()
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        _fail(f"--http-port {text!r} is not a TCP port: give 1-65535, or 0 for a free one")
    return int(text)


async def _serve_until(stop: asyncio.Event, serving: Coroutine[Any, Any, None], where: str,
                       hint: str = "") -> None:
    """Run `serving` until `stop` is set (SIGINT/SIGTERM); a port that cannot
    be bound is one clear error."""
    server = asyncio.create_task(serving)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({server, stopping}, return_when=asyncio.FIRST_COMPLETED)
    server.cancel()
    stopping.cancel()
    try:
        await server
    except asyncio.CancelledError:
        pass  # stopped by a signal
    except OSError as exc:  # the port is taken, the host is not ours
        raise CliError(f"cannot listen on {where}: {exc.strerror or exc}{hint}") from None


async def _serve_dev(registry: Registry, log_url: str, concurrency: int, port: int, query_db: str,
                     grace: float, pools: list[str], processes: int = 1,
                     children: Callable[[int], list[str]] | None = None) -> None:
    """A worker and the HTTP API with the dashboard (auth off, loopback only), in one process.

    With `processes` N > 1 this process is member 0 of N; `children(i)` is
    the command line of the i-th other worker process (members 1..N-1, one
    per pool each), which it supervises (engine/cli/supervise.py)."""
    # Imported when the command runs: aiohttp is slow to import and only serve and dev need it (start-up).
    from stepline.server import ServeConfig, serve_api

    sys.setswitchinterval(0.0005)  # as in _serve_worker: this process is ours
    stop = Stop.on_signals()
    config = ServeConfig(api_token=None, webhooks={}, auth_required=False)

    def announce(addresses: list[str]) -> None:
        base = addresses[0]
        err.print(f"dashboard: {base}/   API: {base}/v1/ (no auth: local development only)", highlight=False)

    async with Client(log_url, registry=registry) as client, AsyncExitStack() as clients:
        if processes > 1:
            client.log.split_groups(0, processes)
            concurrency = _share(concurrency, processes)
        # One worker per pool, each with a client of its pool on the one log
        # (a dev process runs every pool unless --pool narrows it).
        workers: list[Worker] = []
        for pool in pools:
            own = client if pool == client.topics.pool else await clients.enter_async_context(
                Client(log=client.log, registry=registry, topics=client.topics.of_pool(pool)))
            workers.append(Worker(registry, client.log, concurrency=concurrency, topics=own.topics, client=own))
        started: list[Worker] = []
        def label(i: int) -> str:
            k, p = divmod(i, len(pools))  # as in dev(): members 1..N-1, one process per pool each
            return f"worker process {k + 1} of {processes} (pool {pools[p]})"

        others = None if children is None else asyncio.create_task(
            _dev_children(children, (processes - 1) * len(pools), stop, label))
        try:
            for worker in workers:
                if not await start_unless_stopped(worker, stop):
                    return
                started.append(worker)
            _settle_gc()
            err.print(
                f"stepline dev: worker(s) {', '.join(w.worker_id + ' (pool ' + w.pool + ')' for w in workers)} "
                f"on {redact_text(log_url)}: {len(registry)} task(s): {', '.join(registry.ids())}",
                highlight=False, markup=False,
            )
            await _serve_until(stop.requested, serve_api(client, config, registry, "127.0.0.1", port,
                                                         query_db=query_db, on_listening=announce),
                               f"127.0.0.1:{port}", " (pick another with --port, or --port 0 for a free one)")
            await asyncio.gather(*(drain(w, grace, stop) for w in started))
        finally:
            for worker in reversed(started):
                await worker.close()
            if others is not None:
                stop.requested.set()
                code = await others
                if code:
                    raise CliError(f"a worker process of stepline dev --processes {processes} failed "
                                   f"(exit {code}; its error is above)")


async def _dev_children(argv: Callable[[int], list[str]], count: int, stop: Stop,
                        label: Callable[[int], str]) -> int:
    """The other worker processes of `stepline dev --processes N`: the dev
    process's signals (its Stop) reach them, the first as a drain, a second
    as a cancel."""
    from stepline.cli.supervise import Supervisor

    supervisor = Supervisor(argv, range(count), json_logs=False, what="stepline dev", label=label)
    running = asyncio.create_task(supervisor.run())
    try:
        for signalled in (stop.requested, stop.now):
            waiting = asyncio.create_task(signalled.wait())
            await asyncio.wait({running, waiting}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if running.done():
                # A process failed at start and the supervisor stopped the
                # others: without them this one owns only its own share.
                stop.signalled()
                break
            supervisor.signal(signal.SIGTERM)
        return await running
    finally:
        if not running.done():  # the dev process failed: its children stop with it
            supervisor.signal(signal.SIGTERM)
            await running


def dev(
    module: Annotated[str, typer.Argument(help="File or module declaring the tasks.")],
    log: LogOpt = DEFAULT_LOG_URL,
    concurrency: ConcurrencyOpt = 256,
    grace: GraceOpt = f"{DEFAULT_SHUTDOWN_GRACE:g}",
    port: Annotated[int, typer.Option(callback=_setting("port"), help=_setting_help(
        "Port of the API and dashboard on 127.0.0.1; 0 picks a free one.", "port"))] = 8080,
    query_db: Annotated[str | None, typer.Option(
        "--query-db", show_default=False, callback=_setting("query_db"),
        help=_setting_help("SQLite file of the query projection behind the dashboard's lists "
                           "(default: beside a SQLite log, else " + DEFAULT_QUERY_DB + ").", "query_db"),
    )] = None,
    pool: Annotated[list[str] | None, typer.Option(
        "--pool", show_default=False, metavar="POOL",
        help="Run only this worker pool's tasks; repeat for several (default: every pool of the app).",
    )] = None,
    processes: ProcessesOpt = "1",
) -> None:
    """Embedded log, a worker per pool, and the HTTP API with the dashboard (no auth), in one process."""
    seconds = _grace(grace)
    configure_logging(json_logs=False)
    count = _processes(processes, log)
    registry = _load_app(module)
    pools = sorted({_pool(registry, p) for p in pool}) if pool else registry.pools()
    children = None
    if count > 1:
        from stepline.cli.supervise import worker_argv  # start-up: only with --processes N

        def children(i: int) -> list[str]:
            # Members 1..N-1 (this process is 0), one process per pool each.
            k, p = divmod(i, len(pools))
            return worker_argv(module, log, member=k + 1, members=count, concurrency=concurrency,
                               grace=seconds, pool=pools[p], json_logs=False, http=None, instance_id=None)
    _run(_serve_dev(registry, log, concurrency, port, query_db or _dev_query_db(log), seconds, pools,
                    count, children), loop=_event_loop())


def worker(
    module: Annotated[str, typer.Argument(help="File or module declaring the tasks.")],
    log: LogOpt = DEFAULT_LOG_URL,
    concurrency: ConcurrencyOpt = 256,
    grace: GraceOpt = f"{DEFAULT_SHUTDOWN_GRACE:g}",
    json_logs: JsonLogsOpt = True,
    http_port: Annotated[str | None, typer.Option(
        "--http-port", show_default=False, metavar="PORT", callback=_setting("http_port"),
        help=_setting_help("Serve /healthz, /readyz and Prometheus /metrics on this port "
                           "(default: none; 0 picks a free one).", "http_port"))] = None,
    http_host: Annotated[str, typer.Option(
        "--http-host", callback=_setting("http_host"),
        help=_setting_help("Interface of the --http-port server.", "http_host"))] = "0.0.0.0",
    pool: Annotated[str, typer.Option(
        "--pool", metavar="POOL", callback=_setting("pool"),
        help=_setting_help("Worker pool to run: only the tasks declared with this pool=.", "pool"))] = DEFAULT_POOL,
    instance_id: Annotated[str | None, typer.Option(
        "--instance-id", show_default=False, metavar="ID", callback=_setting("worker_instance_id"),
        help=_setting_help("Stable id of this worker process slot (Kafka static membership): restarted "
                           "under the same id it takes its partitions back at once. Never share one "
                           "between two live workers (default: none).", "worker_instance_id"))] = None,
    processes: ProcessesOpt = "1",
    member: Annotated[str | None, typer.Option("--member", hidden=True, metavar="K/N")] = None,
) -> None:
    """Run a worker of one pool: owns partitions of its runs topic and executes their runs."""
    seconds = _grace(grace)
    port = _http_port(http_port)
    configure_logging(json_logs=json_logs)
    count = _processes(processes, log, json_logs)
    own = _member(member, json_logs)
    if own is None and count > 1 and port:
        _check_ports(port, count, json_logs)
    registry = _load_app(module, json_logs)
    pool = _pool(registry, pool)
    http = None if port is None else (http_host, port)
    if own is None and count > 1:
        from stepline.cli.supervise import worker_argv  # start-up: only with --processes N

        def argv(k: int) -> list[str]:
            return worker_argv(module, log, member=k, members=count, concurrency=concurrency, grace=seconds,
                               pool=pool, json_logs=json_logs, http=http, instance_id=instance_id)

        _exit(_run(_supervise(argv, range(count), json_logs), json_logs))
        return
    _run(_serve_worker(registry, log, concurrency, seconds, http, pool, json_logs, instance_id, own),
         json_logs, loop=_event_loop(json_logs))


async def _supervise(argv: Callable[[int], list[str]], members: range, json_logs: bool) -> int:
    """`stepline worker --processes N`: N children, each `stepline worker --member k/N`."""
    from stepline.cli.supervise import Supervisor

    supervisor = Supervisor(argv, members, json_logs)
    supervisor.on_signals()
    _say(f"stepline worker: {len(members)} processes (pid {os.getpid()} supervises them)", json_logs,
         processes=len(members), pid=os.getpid())
    return await supervisor.run()


def _share(total: int, members: int) -> int:
    from stepline.cli.supervise import share

    return share(total, members)


def _exit(code: int) -> None:
    if code:
        raise typer.Exit(code)


def _processes(value: str | int, log_url: str, json_logs: bool = False) -> int:
    from stepline.cli.supervise import processes_of

    try:
        return processes_of(value, log_url)
    except CliError as exc:
        _fail(str(exc), json_logs)
        raise


def _member(value: str | None, json_logs: bool = False) -> tuple[int, int] | None:
    if value is None:
        return None
    from stepline.cli.supervise import parse_member

    try:
        return parse_member(value)
    except CliError as exc:
        _fail(str(exc), json_logs)
        raise


def _check_ports(port: int, count: int, json_logs: bool) -> None:
    if port + count - 1 > 65535:
        _fail(f"--http-port {port} with --processes {count}: the processes listen on ports "
              f"{port}-{port + count - 1}, past 65535; pick a lower port", json_logs)


def _event_loop(json_logs: bool = False) -> str:
    """The `event_loop` setting of the long-running commands (uvloop unless told otherwise)."""
    try:
        return load_settings().event_loop
    except SettingsError as exc:
        _fail(str(exc), json_logs)
        raise


def _pool(registry: Registry, name: str) -> str:
    """--pool as a pool the app declares; anything else is one clear error."""
    try:
        check_pool(name)
    except UnknownPool as exc:
        _fail(f"--pool: {exc}")
    if name not in registry.pools():
        _fail(f"--pool {name!r}: no task of the app declares pool={name!r}; "
              f"its pools: {', '.join(registry.pools())}")
    return name


def _grace(value: str | float) -> float:
    try:
        return parse_grace(value)
    except CliError as exc:
        _fail(str(exc))
        raise


def _source_pairs(entries: list[str], flag: str, shape: str, echo: bool) -> dict[str, str]:
    """`SOURCE=VALUE` entries as a dict; `echo=False` keeps secrets out of error messages."""
    pairs: dict[str, str] = {}
    for n, entry in enumerate(entries, 1):
        source, sep, value = entry.partition("=")
        if not sep or not source or not value:
            shown = repr(entry) if echo else f"#{n}"
            raise CliError(f"{flag} {shown} is not {shape}")
        if source in pairs:
            raise CliError(f"{flag} names source {source!r} twice")
        pairs[source] = value
    return pairs


def _webhook_sources(
    webhook: list[str] | None, webhook_event: list[str] | None, webhook_scheme: list[str] | None = None,
) -> dict[str, WebhookSource]:
    from stepline.server import WebhookSource  # start-up: as in _serve_dev

    # Without --webhook flags, the option's callback filled in the setting.
    secrets = _source_pairs(webhook or [], "--webhook", "SOURCE=SECRET", echo=False)
    events = _source_pairs(webhook_event or [], "--webhook-event", "SOURCE=EVENT.NAME", echo=True)
    schemes = _source_pairs(webhook_scheme or [], "--webhook-scheme", "SOURCE=SCHEME", echo=True)
    for flag, named in (("--webhook-event", events), ("--webhook-scheme", schemes)):
        unknown = sorted(set(named) - set(secrets))
        if unknown:
            raise CliError(f"{flag} for source(s) without a --webhook secret: {', '.join(unknown)}")
    return {name: WebhookSource(name, secret, events.get(name), schemes.get(name, "stepline"))
            for name, secret in secrets.items()}


async def _serve_http(
    config: ServeConfig, registry: Registry | None, log_url: str, host: str, port: int,
    query_db: str | None = None, json_logs: bool = False,
) -> None:
    from stepline.server import serve_api  # start-up: as in _serve_dev

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def announce(addresses: list[str]) -> None:
        sources = ", ".join(f"{s.name} ({s.scheme}) -> {s.event}" for s in config.webhooks.values()) or "none"
        auth = "bearer token" if config.auth_required else "OFF (--no-auth)"
        _say(f"stepline serve on {', '.join(addresses)} for {redact_text(log_url)}: auth {auth}; "
             f"webhook sources: {sources}", json_logs, addresses=addresses, log=redact_text(log_url),
             auth=config.auth_required, webhook_sources=sorted(config.webhooks))

    async with Client(log_url, registry=registry) as client:
        await _serve_until(stop, serve_api(client, config, registry, host, port, query_db=query_db,
                                           on_listening=announce), f"{host}:{port}")


def serve(
    app_module: AppOpt = None,
    log: LogOpt = DEFAULT_LOG_URL,
    host: Annotated[str, typer.Option(callback=_setting("host"),
                                      help=_setting_help("Interface to listen on.", "host"))] = "127.0.0.1",
    port: Annotated[int, typer.Option(callback=_setting("port"),
                                      help=_setting_help("TCP port; 0 picks a free one.", "port"))] = 8080,
    api_token: Annotated[str | None, typer.Option(
        "--api-token", show_default=False, callback=_setting("api_token"),
        help=_setting_help("Bearer token the /v1/ API requires. Prefer the variable: other users can read argv.",
                           "api_token"),
    )] = None,
    webhook: Annotated[list[str] | None, typer.Option(
        "--webhook", show_default=False, callback=_setting("webhooks"),
        help=_setting_help("SOURCE=SECRET: accept deliveries signed with SECRET at /v1/webhooks/SOURCE "
                           "(repeatable; the variable is comma-separated SOURCE=SECRET).", "webhooks"),
    )] = None,
    webhook_event: Annotated[list[str] | None, typer.Option(
        "--webhook-event", show_default=False,
        help="SOURCE=EVENT.NAME: publish SOURCE's deliveries as EVENT.NAME, not webhook.SOURCE (repeatable).",
    )] = None,
    webhook_scheme: Annotated[list[str] | None, typer.Option(
        "--webhook-scheme", show_default=False, callback=_setting("webhook_schemes"),
        help=_setting_help("SOURCE=SCHEME: how SOURCE signs its deliveries: stepline (default), stripe, "
                           "standard (Standard Webhooks) or github (repeatable).", "webhook_schemes"),
    )] = None,
    max_body_bytes: Annotated[int, typer.Option(min=1, callback=_setting("max_body_bytes"), help=_setting_help(
        "Largest request body accepted.", "max_body_bytes"))] = DEFAULT_MAX_BODY_BYTES,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Serve the API without a token (local use only).")] = False,
    query_db: Annotated[str, typer.Option(
        "--query-db", callback=_setting("query_db"),
        help=_setting_help("SQLite file of the query projection behind the run and event lists, kept up "
                           "to date by this process; '' serves without lists (they answer 503).", "query_db"),
    )] = DEFAULT_QUERY_DB,
    shadow_path: Annotated[str | None, typer.Option(
        "--shadow-path", envvar="STEPLINE_SHADOW_PATH", show_default=False,
        help="Folder whose modules GET /v1/runs/{id}/shadow?module=NAME may import and run "
             "(needs the token; default: none, only the --app code)."),
    ] = None,
    json_logs: JsonLogsOpt = True,
) -> None:
    """Serve the HTTP API: trigger runs, publish events, read and list runs, receive signed webhooks."""
    from stepline.server import ServeConfig  # start-up: as in _serve_dev

    configure_logging(json_logs=json_logs)
    if not api_token and not no_auth:
        _fail("stepline serve needs an API token: set STEPLINE_API_TOKEN (or api_token in stepline.toml, "
              "or pass --api-token), or pass --no-auth for local development", json_logs)
    registry = _load_app(app_module, json_logs) if app_module else None
    try:
        config = ServeConfig(api_token, _webhook_sources(webhook, webhook_event, webhook_scheme),
                             max_body_bytes=max_body_bytes, auth_required=not no_auth,
                             shadow_path=shadow_path)
        if shadow_path is not None and not os.path.isdir(shadow_path):
            raise CliError(f"--shadow-path {shadow_path!r} is not a folder")
    except (SteplineError, CliError) as exc:
        _fail(str(exc), json_logs)
        raise
    _run(_serve_http(config, registry, log, host, port, query_db or None, json_logs), json_logs)


def register(app: typer.Typer) -> None:
    app.command()(dev)
    app.command()(worker)
    app.command()(serve)


__all__ = ["register"]
