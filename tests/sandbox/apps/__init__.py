"""Real applications for the sandbox's pods, installed from pinned requirements (see ``envs``).

- ``django_site``: one Django project run two ways: Django 5.0.1 under uvicorn (ASGI), which leaks
  a connection whenever a client disconnects mid-request (ticket #35059) and, with
  ``SQLCOMMENTER=1``, tags every query with Google's sqlcommenter (installed in its environment
  only), and Django 5.0.2 under gunicorn's sync workers with persistent connections
  (``CONN_MAX_AGE``) and no health checks;
- ``pools``: a WSGI app over a psycopg_pool ``ConnectionPool`` (``check=None``) or a SQLAlchemy
  ``QueuePool`` (``pool_pre_ping=False``), or without a pool, leaking a connection per request
  whose statement carries a planted secret (``planted``);
- ``node`` (installed by ``node_env``): a node-postgres app under Node's http module, with a
  ``pg.Pool`` or a leaked ``pg.Client`` per request (with or without an 'error' listener: without,
  the process exits when the server closes one of its idle connections);
- ``deploy``: a Deployment of one of them with the HTTP driver (``sandbox.workloads.driver``) as a
  second container of the same pod.
"""
