"""Connections per pod seen over the last hour, what the status keeps of them, and pods above
their workload's declared figure."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from connbudget.cli import crd_schema
from connbudget.policy import attribution, hints, occupancy, usage
from connbudget.policy.evidence import OwnerClass
from connbudget.policy.occupancy import BUCKET_SECONDS, WINDOW_SECONDS, Occupancy, PerPodFigures
from connbudget.report import status
from unit.builders import NOW, idle_group, pod, pooling, sample, spec

WEB = "Deployment/web"


def test_the_percentile_is_a_value_seen_by_nearest_rank() -> None:
    assert occupancy.percentile([], 95) == 0
    assert occupancy.percentile([3], 95) == 3
    assert occupancy.percentile(list(range(1, 101)), 95) == 95
    assert (
        occupancy.percentile([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 40], 95) == 1
    )


def test_a_pods_busiest_poll_of_each_minute_is_what_counts() -> None:
    occ = Occupancy()
    occ.observe(at=NOW, counts={WEB: {"web-1": 4, "web-2": 6}})
    occ.observe(at=NOW + 1, counts={WEB: {"web-1": 9, "web-2": 5}})
    assert occ.figures(at=NOW + 1) == {WEB: PerPodFigures(p95=9, peak=9)}


def test_one_warm_up_burst_is_the_peak_not_the_percentile() -> None:
    occ = Occupancy()
    for minute in range(30):
        counts = {f"web-{i}": 10 for i in range(4)}
        if minute == 0:
            counts["web-0"] = 40  # the first pod's warm-up
        occ.observe(at=NOW + minute * BUCKET_SECONDS, counts={WEB: counts})
    assert occ.figures(at=NOW + 30 * BUCKET_SECONDS) == {WEB: PerPodFigures(p95=10, peak=40)}


def test_what_is_older_than_the_window_is_forgotten() -> None:
    occ = Occupancy()
    occ.observe(at=NOW, counts={WEB: {"web-1": 50}, "Deployment/api": {"api-1": 3}})
    occ.observe(at=NOW + WINDOW_SECONDS / 2, counts={WEB: {"web-1": 5}})
    later = NOW + WINDOW_SECONDS + BUCKET_SECONDS
    assert occ.figures(at=later) == {WEB: PerPodFigures(p95=5, peak=5)}
    assert occ.figures(at=later + WINDOW_SECONDS) == {}


@given(
    polls=st.lists(
        st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(0, 500), min_size=1),
        min_size=1,
        max_size=40,
    )
)
def test_the_percentile_never_exceeds_the_peak_which_is_the_most_seen(
    polls: list[dict[str, int]],
) -> None:
    occ = Occupancy()
    for i, counts in enumerate(polls):
        occ.observe(at=NOW + i * 7, counts={WEB: counts})
    fig = occ.figures(at=NOW + len(polls) * 7)[WEB]
    assert fig.p95 <= fig.peak == max(n for c in polls for n in c.values())


def test_every_governed_pod_counts_zero_when_it_holds_nothing_and_pooled_clients_do_not() -> None:
    web1, web2 = pod("web-1", "10.0.0.1"), pod("web-2", "10.0.0.2")
    smp = sample([idle_group(web1, [5.0] * 3)])
    attributed = attribution.attribute_backends(
        groups=smp.groups,
        index=attribution.PodIndex.build([web1, web2], namespace="shop"),
        mode=spec().attribution,
    )
    counts = occupancy.pod_counts(governed=[web1, web2], attributed=attributed)
    assert counts == {WEB: {"web-1": 3, "web-2": 0}}


def test_the_status_keeps_the_figures_next_to_the_reuse_gap_in_the_crds_fields() -> None:
    web1 = pod("web-1", "10.0.0.1")
    smp = sample([idle_group(web1, [5.0] * 3)])
    attributed = attribution.attribute_backends(
        groups=smp.groups,
        index=attribution.PodIndex.build([web1], namespace="shop"),
        mode=spec().attribution,
    )
    u = usage.compute_usage(
        spec=spec(),
        namespace="shop",
        sample=smp,
        attributed=attributed,
        owners={WEB: pooling(WEB)},
        per_pod={WEB: PerPodFigures(p95=3, peak=7)},
    )
    out = status.render_status({}, status.Outcome(generation=1, now=NOW, usage=u))
    (row,) = out["usage"]["byOwner"]
    assert (row["connectionsPerPodP95"], row["connectionsPerPodPeak"]) == (3, 7)
    assert "maxReuseGapSeconds" in row
    declared = crd_schema()["properties"]["status"]["properties"]["usage"]["properties"]
    assert set(row) <= set(declared["byOwner"]["items"]["properties"])


def test_pods_above_the_declared_figure_are_found_busiest_first() -> None:
    counts = {"web-1": 10, "web-2": 14, "web-3": 12, "web-4": 3}
    assert occupancy.find_pods_above(counts, declared=10) == ["web-2", "web-3"]
    assert occupancy.find_pods_above(counts, declared=14) == []


def test_a_pod_above_its_declared_figure_gets_a_hint() -> None:
    web1, web2 = pod("web-1", "10.0.0.1"), pod("web-2", "10.0.0.2")
    smp = sample([idle_group(web1, [5.0] * 12), idle_group(web2, [5.0] * 4)])
    attributed = attribution.attribute_backends(
        groups=smp.groups,
        index=attribution.PodIndex.build([web1, web2], namespace="shop"),
        mode=spec().attribution,
    )
    owners = {WEB: pooling(WEB)}
    (facts,) = hints.owner_facts(
        owners=owners, attributed=attributed, shapes={}, budget=80, declared={WEB: 10}
    )
    assert facts.above_declared == ("web-1",)
    assert facts.cls is OwnerClass.POOLING
    assert hints.hint_for(facts) == (
        "pod web-1 holds 12 connections, above the 10 per pod its"
        " connbudget.io/connections-per-pod annotation declares: budget admission counts its pods"
        " at the declared figure; raise the annotation or lower its pool size"
    )
    (within,) = hints.owner_facts(
        owners=owners, attributed=attributed, shapes={}, budget=80, declared={WEB: 12}
    )
    assert within.above_declared == ()
