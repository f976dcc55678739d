"""Watch events: pods and ConnectionBudgets feed the reconciler's caches (no LIST per poll).

``on.event`` handlers put no finalizer and no annotation on the objects they watch.
"""

from __future__ import annotations

import kopf

from connbudget.handlers.reconciler import Reconciler
from connbudget.model.spec import GROUP, PLURAL, VERSION


@kopf.on.event("", "v1", "pods", id="pods")
async def pod_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: object) -> None:
    reconciler: Reconciler = memo.reconciler
    reconciler.on_pod(type, body)


@kopf.on.event(GROUP, VERSION, PLURAL, id="budgets")
async def budget_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: object) -> None:
    reconciler: Reconciler = memo.reconciler
    await reconciler.on_budget(type, body)
