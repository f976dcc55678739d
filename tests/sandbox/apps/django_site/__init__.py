"""One small Django project (``django.contrib.auth``), run by Django 5.0.1 under uvicorn or by
Django 5.0.2 under gunicorn, from the environment's own ``bin/``; see ``start``."""
