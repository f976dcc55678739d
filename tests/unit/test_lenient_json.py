"""The probe's JSON loader keeps names that are not UTF-8 as ``\\xNN`` text (no database)."""

from __future__ import annotations

from connbudget.probe.postgres import LenientJsonLoader


def test_bytes_that_are_not_utf8_become_escapes_and_the_rest_is_kept() -> None:
    loader = LenientJsonLoader(0)
    raw = b'[["bad\xff\xfe(", "' + "émoji😀".encode() + b'", "q\'u\\"o", "ctl\\u0001"]]'
    assert loader.load(raw) == [["bad\\xff\\xfe(", "émoji😀", "q'u\"o", "ctl\x01"]]


def test_valid_json_is_loaded_as_psycopg_would() -> None:
    assert LenientJsonLoader(0).load(b'{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}


def test_names_that_are_not_utf8_are_kept_as_escapes_in_text_columns() -> None:
    from connbudget.probe.postgres import LenientTextLoader

    loader = LenientTextLoader(0)
    assert loader.load(b"bad\xff\xfe\xc3(") == "bad\\xff\\xfe\\xc3("
    assert loader.load("émoji😀 q'u\"o ctl\x01".encode()) == "émoji😀 q'u\"o ctl\x01"
