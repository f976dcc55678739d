"""Reporting: status rendering (pure), Event reasons and messages, Prometheus metrics."""
