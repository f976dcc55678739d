"""kopf glue: handlers unpack kopf's arguments, call ``cycle`` and write ``patch.status``.

Importing this package registers every handler with kopf.
"""

from connbudget.handlers import budgets, indexes, lifecycle

__all__ = ["budgets", "indexes", "lifecycle"]
