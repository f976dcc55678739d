"""Read ConnectionBudgets for the command line (``connbudget leaks``), as kubectl would.

I/O against the Kubernetes API through the official (synchronous) client: a command runs one
call and exits, so there is no event loop to keep free. The client's exceptions never leave this
module: every failure is a ``BudgetsUnreadable`` naming its ``Problem``, for the caller to turn
into one line saying what to do.

Unlike the operator (``api.Kube.from_environment``, in-cluster first), a command prefers the
kubeconfig (``--kubeconfig``, else ``$KUBECONFIG``, else ``~/.kube/config``) with its current or
given context, and falls back to the pod's ServiceAccount only when no kubeconfig exists: the
kubectl order, so ``kubectl connbudget`` and ``kubectl get`` talk to the same cluster.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import urllib3
from kubernetes.client.rest import ApiException

from connbudget import __version__
from connbudget.kube.api import CONNECT_TIMEOUT_SECONDS, REQUEST_TIMEOUT_SECONDS, _reason
from connbudget.model.spec import GROUP, PLURAL, VERSION

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_NAMESPACE = "default"


class Problem(enum.StrEnum):
    NO_CONFIG = "NoConfig"  # no kubeconfig, not in a pod, or a context that is not there
    UNREACHABLE = "Unreachable"  # no answer from the API server (refused, DNS, TLS, timeout)
    UNAUTHORIZED = "Unauthorized"  # 401: the credentials were rejected
    FORBIDDEN = "Forbidden"  # 403: no RBAC to list ConnectionBudgets there
    NOT_SERVED = "NotServed"  # 404: the CRD (or this version of it) is not installed
    FAILED = "Failed"  # any other answer


class BudgetsUnreadable(Exception):
    """ConnectionBudgets could not be listed; ``problem`` says why, the message gives detail."""

    def __init__(self, problem: Problem, detail: str, *, namespace: str | None = None) -> None:
        super().__init__(detail)
        self.problem = problem
        self.detail = detail
        self.namespace = namespace  # None: every namespace (or not known yet)


@dataclass(frozen=True, kw_only=True)
class BudgetList:
    namespace: str | None  # where they were listed; None: every namespace
    items: list[dict[str, Any]]  # the ConnectionBudgets as the API returned them


def _client(kubeconfig: str | None, context: str | None) -> tuple[Any, str]:
    """An API client and the namespace its context names (kubectl's default namespace)."""
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=config
        )
        contexts, active = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
        if context is not None:
            active = next((c for c in contexts if c.get("name") == context), active)
        namespace = str(((active or {}).get("context") or {}).get("namespace") or "")
    except kubernetes.config.ConfigException as e:
        # kubectl's order: no kubeconfig at all, then the pod's ServiceAccount (if in a pod).
        if "No configuration found" not in str(e) or kubeconfig is not None or context:
            raise BudgetsUnreadable(Problem.NO_CONFIG, str(e)) from None
        try:
            kubernetes.config.load_incluster_config(client_configuration=config)
        except kubernetes.config.ConfigException:
            raise BudgetsUnreadable(Problem.NO_CONFIG, str(e)) from None
        try:
            namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        except OSError:
            namespace = ""
    except Exception as e:
        # The loader reads YAML and runs credential plugins, and fails with whatever they raise
        # (a YAML error, a TypeError on a kubeconfig that is a string, an unreadable file): each
        # is a kubeconfig that cannot be used, never a traceback.
        raise BudgetsUnreadable(Problem.NO_CONFIG, f"{type(e).__name__}: {e}") from None
    # One attempt: a command should say at once that the API server does not answer.
    config.retries = False
    api = kubernetes.client.ApiClient(config)
    api.user_agent = f"connbudget-cli/{__version__}"
    return api, namespace or DEFAULT_NAMESPACE


def read_budgets(
    *,
    namespace: str | None,
    all_namespaces: bool,
    kubeconfig: str | None = None,
    context: str | None = None,
) -> BudgetList:
    """List the ConnectionBudgets of one namespace, or of every one.

    Args:
        namespace: where to list; None for the context's namespace (else ``default``).
        all_namespaces: list across every namespace (``namespace`` is then ignored).
        kubeconfig: a kubeconfig file; None for ``$KUBECONFIG`` or ``~/.kube/config``.
        context: a context of the kubeconfig; None for its current one.

    Returns:
        Where they were listed and the objects, as plain dicts.

    Raises:
        BudgetsUnreadable: with the ``Problem`` that stopped it.
    """
    api, context_namespace = _client(kubeconfig, context)
    where = None if all_namespaces else (namespace or context_namespace)
    custom = kubernetes.client.CustomObjectsApi(api)
    timeout = (CONNECT_TIMEOUT_SECONDS, REQUEST_TIMEOUT_SECONDS)
    try:
        if where is None:
            listed = custom.list_cluster_custom_object(
                GROUP, VERSION, PLURAL, _request_timeout=timeout
            )
        else:
            listed = custom.list_namespaced_custom_object(
                GROUP, VERSION, where, PLURAL, _request_timeout=timeout
            )
    except ApiException as e:
        raise BudgetsUnreadable(
            problem_of(int(e.status or 0)), _reason(e), namespace=where
        ) from None
    except (OSError, urllib3.exceptions.HTTPError) as e:
        host = str(getattr(api.configuration, "host", "") or "the API server")
        # urllib3 wraps the cause (refused, DNS, TLS, timeout) in MaxRetryError.reason.
        cause = getattr(e, "reason", None) or e
        raise BudgetsUnreadable(
            Problem.UNREACHABLE, f"{host}: {type(cause).__name__}: {cause}", namespace=where
        ) from None
    finally:
        api.close()
    items = listed.get("items") if isinstance(listed, dict) else None
    return BudgetList(
        namespace=where,
        items=[i for i in items or [] if isinstance(i, dict)],
    )


def problem_of(status: int) -> Problem:
    """The ``Problem`` an HTTP status of a list call means."""
    return {
        401: Problem.UNAUTHORIZED,
        403: Problem.FORBIDDEN,
        404: Problem.NOT_SERVED,
    }.get(status, Problem.FAILED)
