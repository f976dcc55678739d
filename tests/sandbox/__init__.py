"""The connbudget sandbox: a real Kubernetes control plane, PostgreSQL and PgBouncer on one machine.

Test-only code. The operator package (``connbudget``) never imports it; an import-linter contract
keeps it that way.
"""
