"""A CA from the Secret: parsed from the spec, written privately, given to libpq (no database)."""

from __future__ import annotations

import os
import stat

import pytest

from connbudget.model.spec import SecretRef, SpecError, parse_spec
from connbudget.probe.postgres import ca_file, dsn_key, tls_options

BASE = {
    "budget": {"maxConnections": 20},
    "selector": {"matchLabels": {"app": "web"}},
}
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"


def test_ca_key_is_optional_and_parsed() -> None:
    plain = parse_spec({**BASE, "database": {"secretRef": {"name": "pg"}}})
    assert plain.database_secret == SecretRef(name="pg", key="dsn", ca_key=None)
    tls = parse_spec({**BASE, "database": {"secretRef": {"name": "pg", "caKey": "ca.crt"}}})
    assert tls.database_secret.ca_key == "ca.crt"
    with pytest.raises(SpecError, match="caKey"):
        parse_spec({**BASE, "database": {"secretRef": {"name": "pg", "caKey": ""}}})


def test_the_ca_file_is_private_and_removed_after_use() -> None:
    with ca_file(PEM) as path:
        assert path is not None
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with open(path) as f:
            assert f.read() == PEM + "\n"
    assert not os.path.exists(path)
    with ca_file(None) as nothing:
        assert nothing is None


def test_a_ca_means_verify_full_unless_the_dsn_says_otherwise() -> None:
    assert tls_options("host=db", None) == {}
    assert tls_options("host=db", "/x.pem") == {"sslrootcert": "/x.pem", "sslmode": "verify-full"}
    assert tls_options("postgresql://u@db/app?sslmode=verify-ca", "/x.pem") == {
        "sslrootcert": "/x.pem"
    }


def test_another_ca_is_another_monitor() -> None:
    assert dsn_key("host=db", PEM) != dsn_key("host=db")
    assert dsn_key("host=db", PEM) == dsn_key("host=db", PEM)
