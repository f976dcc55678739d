"""Pure decisions: attribution, usage, forecast, remediation plans. No I/O, no clock."""
