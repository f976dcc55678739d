"""The metrics the README documents are the ones the operator exports, with the labels it says."""

from __future__ import annotations

from observability.promql import BUDGET_LABELS, documented_metrics, exported_samples, sample_names


def test_every_documented_metric_is_exported_with_its_documented_labels() -> None:
    exported = exported_samples()
    documented = documented_metrics()
    assert documented, "the README documents no metric"
    for name, labels in documented.items():
        samples = sample_names(name, exported)
        assert samples, f"the README documents {name}, which the operator does not export"
        for sample in samples:
            assert labels <= exported[sample], (
                f"{sample}: the README says {sorted(labels)}, exported {sorted(exported[sample])}"
            )


def test_every_budgets_metric_carries_the_namespace_and_the_budget() -> None:
    # Series of one budget say which; the operator-wide ones (monitoring connections, API
    # throttling) carry neither.
    exported = exported_samples()
    for sample, labels in exported.items():
        if labels & BUDGET_LABELS:
            assert labels >= BUDGET_LABELS, sample
    assert not exported["connbudget_monitor_connections"]
    assert exported["connbudget_usage_ratio"] >= BUDGET_LABELS


def test_a_documented_label_the_operator_lacks_is_found() -> None:
    text = "metrics (`connbudget_usage_ratio{owner}`, `connbudget_monitor` is a role)"
    documented = documented_metrics(text)
    assert documented == {"connbudget_usage_ratio": frozenset({"owner"})}
    exported = exported_samples()
    assert not documented["connbudget_usage_ratio"] <= exported["connbudget_usage_ratio"]
