"""The app's views: one or two ORM queries per request, one JSON log line per request.

``/work?idle=S`` (sync) and ``/awork?idle=S`` (async, for ASGI) run ``User.objects.count()``;
with ``idle`` > 0 they then wait ``S`` seconds on the same connection and run a second query, like a
request that calls another service between two queries. Database errors are classified
(``sandbox.workloads.outcomes``) and answered with status 503.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from django.contrib.auth.models import User  # type: ignore[import-not-found]
from django.db import DatabaseError  # type: ignore[import-not-found]
from django.http import JsonResponse  # type: ignore[import-not-found]

from sandbox.workloads.common import log
from sandbox.workloads.outcomes import classify_exception

MAX_IDLE = 30.0  # seconds


def _idle(request: Any) -> float:
    try:
        return min(MAX_IDLE, max(0.0, float(request.GET.get("idle", "0"))))
    except ValueError:
        return 0.0


def _answer(outcome: str, started: float, idle: float, **fields: object) -> Any:
    ms = round((time.monotonic() - started) * 1000)
    log("request", outcome=outcome, idle=idle, ms=ms, pid=os.getpid(), **fields)
    return JsonResponse({"outcome": outcome, **fields}, status=200 if outcome == "ok" else 503)


def _failed(e: BaseException, started: float, idle: float, *, in_flight: bool) -> Any:
    outcome, reason = classify_exception(e, in_flight=in_flight)
    return _answer(outcome, started, idle, error=type(e).__name__, reason=reason)


def work(request: Any) -> Any:
    idle = _idle(request)
    started = time.monotonic()
    in_flight = False
    try:
        User.objects.count()
        in_flight = True
        if idle:
            time.sleep(idle)
            User.objects.filter(is_active=True).count()
    except DatabaseError as e:
        return _failed(e, started, idle, in_flight=in_flight)
    return _answer("ok", started, idle)


async def awork(request: Any) -> Any:
    idle = _idle(request)
    started = time.monotonic()
    in_flight = False
    try:
        await User.objects.acount()
        in_flight = True
        if idle:
            await asyncio.sleep(idle)
            await User.objects.filter(is_active=True).acount()
    except DatabaseError as e:
        return _failed(e, started, idle, in_flight=in_flight)
    return _answer("ok", started, idle)


def healthz(request: Any) -> Any:
    return JsonResponse({"ok": True})
