"""connbudget: a Kubernetes operator that keeps PostgreSQL inside a connection budget."""

__version__ = "0.1.0"
