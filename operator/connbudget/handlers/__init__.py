"""kopf glue: start-up and shut-down, and the watch events that feed the reconciler.

Importing this package registers every handler with kopf.
"""

from connbudget.handlers import lifecycle, watches

__all__ = ["lifecycle", "watches"]
