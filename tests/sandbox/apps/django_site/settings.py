"""Settings from the environment, as a twelve-factor Django app has them.

- ``DATABASE_URL``: ``postgresql://user:password@host:port/name`` (from the pod's Secret);
- ``PGAPPNAME``: the ``application_name`` of every connection (the pod's name);
- ``CONN_MAX_AGE``: seconds a connection is kept between requests (default 0: closed at the end of
  each request, as Django's documentation asks under ASGI); ``CONN_HEALTH_CHECKS``: ``0`` (default)
  or ``1``;
- ``SQLCOMMENTER``: ``1`` tags every query of a request with Google's sqlcommenter comment
  (``controller``, ``framework``, ``route``; see ``sqlcommenter``); ``0`` (default) leaves the SQL
  as Django writes it.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

_url = urlsplit(os.environ.get("DATABASE_URL", ""))

SECRET_KEY = "sandbox-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "sandbox.apps.django_site.urls"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth"]
MIDDLEWARE: list[str] = (
    ["sandbox.apps.django_site.sqlcommenter.middleware"]
    if os.environ.get("SQLCOMMENTER", "0") == "1"
    else []
)
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": (_url.path or "/").lstrip("/"),
        "USER": unquote(_url.username or ""),
        "PASSWORD": unquote(_url.password or ""),
        "HOST": _url.hostname or "",
        "PORT": str(_url.port or ""),
        "CONN_MAX_AGE": int(os.environ.get("CONN_MAX_AGE", "0")),
        "CONN_HEALTH_CHECKS": os.environ.get("CONN_HEALTH_CHECKS", "0") == "1",
        "OPTIONS": {"application_name": os.environ.get("PGAPPNAME", "django")},
    }
}
# Django's own loggers print nothing: the views log one JSON line per request.
LOGGING_CONFIG = None

# CPython's cyclic garbage collector is what finally closes a connection that Django leaked: an
# abandoned request's objects (its task, its DatabaseWrapper) form cycles. How long that takes
# depends on the heap and the allocation rate; in a process this small, CPython's default thresholds
# (700, 10, 10) reclaim most of them within seconds, where a large, busy app keeps them for minutes.
# ``GC_THRESHOLD`` (``gen0,gen1,gen2``) sets ``gc.set_threshold``, as apps tuned against collection
# pauses do; ``GC_LOG=1`` logs each collection that freed something.
if os.environ.get("GC_THRESHOLD"):
    import gc

    gc.set_threshold(*(int(n) for n in os.environ["GC_THRESHOLD"].split(",")))

if os.environ.get("GC_LOG") == "1":
    import gc

    from sandbox.workloads.common import log as _log

    def _gc_log(phase: str, info: dict[str, int]) -> None:
        if phase == "stop" and info.get("collected"):
            _log("gc", generation=info.get("generation"), collected=info.get("collected", 0))

    gc.callbacks.append(_gc_log)
