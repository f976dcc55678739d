"""sqlcommenter's tags on every query a request runs, under ASGI with async views as under WSGI.

With ``SQLCOMMENTER=1`` (see ``settings``) each query gets Google's sqlcommenter comment, built by
the package's own ``QueryWrapper`` (``google-cloud-sqlcommenter``), for example::

    SELECT COUNT(*) AS "__count" FROM "auth_user"
    /*controller='awork',framework='django%3A5.0.1',route='awork'*/

The package's middleware (``google.cloud.sqlcommenter.django.middleware.SqlCommenter``) is not
used, because under Django 5.0.1's ASGI handler it changes the app: it is sync-only, so Django runs
it in the request's thread and the async view behind it through ``async_to_sync``. A client that
hangs up then no longer cancels the view, and ``ThreadSensitiveContext`` waits for that thread
*on the event loop* (``executor.shutdown()``): every abandoned request stalls the whole server
until its view returns (measured: ~1 s per abandoned request, half the requests served). Its
``connection.execute_wrapper`` would not reach an async view's queries either, had the middleware
been async: Django's connections are thread-critical, and ``acount()`` runs in another thread.

So this middleware is sync- and async-capable and only keeps the request in a context variable
(``sync_to_async`` copies the context into the query's thread); a wrapper installed on each new
database connection (``connection_created``) comments the queries that run under a request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from asgiref.sync import iscoroutinefunction  # type: ignore[import-not-found]
from django.db.backends.signals import connection_created  # type: ignore[import-not-found]
from django.utils.decorators import sync_and_async_middleware  # type: ignore[import-not-found]
from google.cloud.sqlcommenter.django.middleware import (  # type: ignore[import-not-found]
    QueryWrapper,
)

_request: ContextVar[Any] = ContextVar("sqlcommenter_request", default=None)


def comment_query(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
    """Run the query with the sqlcommenter comment of the request it runs under, if any."""
    request = _request.get()
    if request is None:
        return execute(sql, params, many, context)
    return QueryWrapper(request)(execute, sql, params, many, context)


def _install(sender: Any, connection: Any, **kwargs: Any) -> None:
    # A DatabaseWrapper reconnects after CONN_MAX_AGE: wrap it once.
    if comment_query not in connection.execute_wrappers:
        connection.execute_wrappers.append(comment_query)


@sync_and_async_middleware  # type: ignore[untyped-decorator]
def middleware(get_response: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Keep the request in a context variable while the view runs (Django middleware factory)."""
    connection_created.connect(_install, weak=False, dispatch_uid=__name__)
    if iscoroutinefunction(get_response):
        get_async: Callable[[Any], Awaitable[Any]] = get_response

        async def handle_async(request: Any) -> Any:
            token = _request.set(request)
            try:
                return await get_async(request)
            finally:
                _request.reset(token)

        return handle_async

    def handle(request: Any) -> Any:
        token = _request.set(request)
        try:
            return get_response(request)
        finally:
            _request.reset(token)

    return handle
