"""Budget admission arithmetic: the worst case a workload's spec allows, and its message."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connbudget.policy import admission
from connbudget.policy.admission import PerPodSource, Verdict

MAX_REPLICAS = 100_000
surges = st.one_of(
    st.integers(min_value=0, max_value=1000), st.integers(0, 500).map(lambda p: f"{p}%")
)


def web(replicas: int = 10, max_surge: admission.IntOrPercent = 2) -> admission.Workload:
    return admission.Workload(
        kind="Deployment", namespace="shop", name="web", replicas=replicas, max_surge=max_surge
    )


def worst(
    workload: admission.Workload,
    *,
    per_pod: int = 10,
    others: int = 0,
    budget: int = 100,
    hpa: admission.Autoscaler | None = None,
) -> admission.WorstCase:
    return admission.evaluate_worst_case(
        workload=workload,
        per_pod=per_pod,
        per_pod_source=PerPodSource.DECLARED,
        others=others,
        budget=budget,
        budget_name="shop/db",
        autoscaler=hpa,
    )


@pytest.mark.parametrize(
    ("value", "desired", "pods"),
    [
        pytest.param(2, 10, 2, id="a-number-as-it-is"),
        pytest.param(0, 10, 0, id="zero"),
        pytest.param("25%", 10, 3, id="25-percent-of-10-rounds-up"),
        pytest.param("25%", 4, 1, id="exact"),
        pytest.param("1%", 1, 1, id="one-percent-of-one-is-a-pod"),
        pytest.param("25%", 0, 0, id="of-no-replicas"),
        pytest.param("0%", 50, 0, id="zero-percent"),
        pytest.param("150%", 3, 5, id="above-100-percent"),
    ],
)
def test_surge_is_resolved_as_the_deployment_controller_does(
    value: admission.IntOrPercent, desired: int, pods: int
) -> None:
    assert admission.scaled_surge(value, desired=desired) == pods


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("5", id="digits-without-percent"),
        pytest.param("-5%", id="negative-percent"),
        pytest.param("25 %", id="space"),
        pytest.param("1.5%", id="fraction"),
        pytest.param(-1, id="negative"),
        pytest.param(True, id="boolean"),
    ],
)
def test_a_surge_the_api_server_refuses_is_an_error(value: Any) -> None:
    with pytest.raises(ValueError, match="maxSurge"):
        admission.scaled_surge(value, desired=10)


@given(percent=st.integers(0, 1000), desired=st.integers(0, MAX_REPLICAS))
def test_percentage_rounding_matches_the_controllers_float_ceiling(
    percent: int, desired: int
) -> None:
    # apimachinery: int(math.Ceil(float64(value) * float64(total) / 100))
    expected = math.ceil(float(percent) * float(desired) / 100)
    assert admission.scaled_surge(f"{percent}%", desired=desired) == expected


def test_the_message_gives_the_arithmetic() -> None:
    w = worst(web(), others=30)
    assert w.verdict is Verdict.BREAKS
    assert admission.explain(w) == (
        "Deployment shop/web may open 12 pods \N{MULTIPLICATION SIGN} 10 connections (declared)"
        " = 120 (10 replicas + 2 surge); with 30 held by other owners that is 150 of the"
        " budget's 100 (ConnectionBudget shop/db): 50 over"
    )


def test_a_fitting_worst_case_says_so_without_an_excess() -> None:
    w = worst(web(replicas=6, max_surge="25%"), per_pod=10, others=10)
    assert (w.pods, w.opens, w.total, w.verdict) == (8, 80, 90, Verdict.FITS)
    assert admission.explain(w).endswith("90 of the budget's 100 (ConnectionBudget shop/db)")


def test_exactly_the_budget_fits() -> None:
    assert worst(web(replicas=8, max_surge=2), per_pod=10).verdict is Verdict.FITS


def test_an_autoscalers_max_replicas_replaces_the_replicas_and_scales_the_surge() -> None:
    hpa = admission.Autoscaler(
        namespace="shop", name="web", target_kind="Deployment", target_name="web", max_replicas=20
    )
    w = worst(web(replicas=2, max_surge="10%"), per_pod=5, budget=200, hpa=hpa)
    assert (w.replicas, w.surge, w.opens) == (20, 2, 110)
    assert "(20 maxReplicas of HorizontalPodAutoscaler shop/web + 2 surge)" in admission.explain(w)


@given(
    replicas=st.integers(0, 1000),
    more=st.integers(0, 1000),
    surge=surges,
    per_pod=st.integers(1, 1000),
    others=st.integers(0, 10_000),
)
def test_the_worst_case_grows_with_the_replicas(
    replicas: int, more: int, surge: admission.IntOrPercent, per_pod: int, others: int
) -> None:
    low = worst(web(replicas, surge), per_pod=per_pod, others=others)
    high = worst(web(replicas + more, surge), per_pod=per_pod, others=others)
    assert high.total >= low.total
    if low.verdict is Verdict.BREAKS:
        assert high.verdict is Verdict.BREAKS


@given(replicas=st.integers(0, 1000), surge=st.integers(0, 1000), more=st.integers(0, 1000))
def test_the_worst_case_grows_with_the_surge(replicas: int, surge: int, more: int) -> None:
    assert worst(web(replicas, surge + more)).total >= worst(web(replicas, surge)).total
    assert worst(web(replicas, f"{surge + more}%")).total >= worst(web(replicas, f"{surge}%")).total


@given(
    replicas=st.integers(0, 1000),
    surge=surges,
    per_pod=st.integers(1, 1000),
    others=st.integers(0, 10_000),
)
def test_the_worst_case_is_never_below_the_replicas_pools(
    replicas: int, surge: admission.IntOrPercent, per_pod: int, others: int
) -> None:
    w = worst(web(replicas, surge), per_pod=per_pod, others=others)
    assert w.opens >= replicas * per_pod
    assert w.total == w.opens + others
    assert (w.verdict is Verdict.FITS) == (w.total <= w.budget)


# --- connections per pod ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("annotations", "observed", "expected"),
    [
        pytest.param({}, None, (None, None), id="neither"),
        pytest.param({}, 7, (7, PerPodSource.OBSERVED), id="observed"),
        pytest.param(
            {admission.CONNECTIONS_PER_POD_ANNOTATION: "10"},
            7,
            (10, PerPodSource.DECLARED),
            id="declared-wins",
        ),
        pytest.param({}, 0, (None, None), id="observed-none-held"),
    ],
)
def test_the_declared_figure_wins_over_the_observed_one(
    annotations: dict[str, str], observed: int | None, expected: tuple[Any, Any]
) -> None:
    got = admission.decide_per_pod(
        annotations=annotations, observed=observed, workload="Deployment shop/web"
    )
    assert (got.connections, got.source) == expected
    assert got.problem is None


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("0", id="zero"),
        pytest.param("-3", id="negative"),
        pytest.param("ten", id="word"),
        pytest.param("10 ", id="trailing-space"),
        pytest.param("2.5", id="fraction"),
        pytest.param("", id="empty"),
        pytest.param("262144", id="above-max-connections"),
    ],
)
def test_an_invalid_declaration_is_a_problem_and_no_number(value: str) -> None:
    got = admission.decide_per_pod(
        annotations={admission.CONNECTIONS_PER_POD_ANNOTATION: value},
        observed=7,
        workload="Deployment shop/web",
    )
    assert got.connections is None
    assert got.problem == (
        "Deployment shop/web: annotation connbudget.io/connections-per-pod must be a positive"
        f" integer (1 to 262143), not {value!r}"
    )


# --- manifests -------------------------------------------------------------------------------


def deployment(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"template": {"metadata": {"labels": {"app": "web"}}}, **spec},
    }


@pytest.mark.parametrize(
    ("doc", "replicas", "surge"),
    [
        pytest.param(deployment(), 1, "25%", id="deployment-defaults"),
        pytest.param(
            deployment(replicas=4, strategy={"rollingUpdate": {"maxSurge": 3}}),
            4,
            3,
            id="deployment-surge",
        ),
        pytest.param(
            deployment(strategy={"rollingUpdate": {"maxSurge": None}}), 1, "25%", id="null"
        ),
        pytest.param(deployment(replicas=4, strategy={"type": "Recreate"}), 4, 0, id="recreate"),
        pytest.param(
            {**deployment(replicas=3), "kind": "StatefulSet"}, 3, 0, id="statefulset-no-surge"
        ),
        pytest.param(
            {
                **deployment(replicas=5, strategy={"canary": {"maxSurge": "50%"}}),
                "apiVersion": "argoproj.io/v1alpha1",
                "kind": "Rollout",
            },
            5,
            "50%",
            id="rollout-canary",
        ),
        pytest.param(
            {
                **deployment(replicas=5, strategy={"blueGreen": {}}),
                "apiVersion": "argoproj.io/v1alpha1",
                "kind": "Rollout",
            },
            5,
            "100%",
            id="rollout-blue-green-full-preview",
        ),
        pytest.param(
            {
                **deployment(replicas=5, strategy={"blueGreen": {"previewReplicaCount": 1}}),
                "apiVersion": "argoproj.io/v1alpha1",
                "kind": "Rollout",
            },
            5,
            1,
            id="rollout-blue-green-preview-count",
        ),
    ],
)
def test_workloads_are_read_with_their_controllers_defaults(
    doc: dict[str, Any], replicas: int, surge: admission.IntOrPercent
) -> None:
    w = admission.workload_of(doc, default_namespace="default")
    assert w is not None
    assert (w.replicas, w.max_surge, dict(w.pod_labels)) == (replicas, surge, {"app": "web"})


def test_other_kinds_and_groups_are_not_workloads() -> None:
    assert admission.workload_of({"kind": "ConfigMap"}, default_namespace="d") is None
    other_group = {**deployment(), "apiVersion": "example.com/v1"}
    assert admission.workload_of(other_group, default_namespace="d") is None


def test_invalid_replicas_are_an_error() -> None:
    with pytest.raises(ValueError, match=r"Deployment shop/web: spec.replicas"):
        admission.workload_of(deployment(replicas="3"), default_namespace="d")


def test_an_autoscaler_is_read_with_its_target() -> None:
    doc = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "web-hpa"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
            "minReplicas": 2,
            "maxReplicas": 12,
        },
    }
    assert admission.autoscaler_of(doc, default_namespace="shop") == admission.Autoscaler(
        namespace="shop",
        name="web-hpa",
        target_kind="Deployment",
        target_name="web",
        max_replicas=12,
    )
