"""Statement shapes: every literal goes, the code's shape and its tags stay (policy.fingerprint)."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from connbudget.policy import fingerprint
from connbudget.policy.fingerprint import (
    HIDDEN,
    STATEMENT_LIMIT,
    TAG_KEYS,
    Statement,
    normalise,
    parse_tags,
    rank_statements,
    statement_of,
)

# What Django 5 sends for a session lookup, tagged by google-cloud-sqlcommenter's middleware
# (values URL-quoted, keys sorted; the driver turned its "%%" into "%").
DJANGO_SESSION = (
    'SELECT "django_session"."session_key", "django_session"."session_data",'
    ' "django_session"."expire_date" FROM "django_session" WHERE'
    ' ("django_session"."expire_date" > \'2026-12-03T12:00:00.123456+00:00\'::timestamptz'
    ' AND "django_session"."session_key" = \'q8zv1nb0k3y5s3ss10nk3y0000000000\') LIMIT 21'
    " /*controller='sync',framework='django%3A5.0.1',route='%5Esync/%24'*/"
)
DJANGO_SESSION_SHAPE = (
    'SELECT "django_session"."session_key", "django_session"."session_data",'
    ' "django_session"."expire_date" FROM "django_session" WHERE'
    ' ("django_session"."expire_date" > ?::timestamptz AND "django_session"."session_key" = ?)'
    " LIMIT ?"
)
DJANGO_TAGS = {"route": "^sync/$", "controller": "sync", "framework": "django:5.0.1"}

SECRETS = ("hunter2", "pa'ss", "s3cret", "x-tag-body", "4111111111111111", "swordfish")


# --- literals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "shape"),
    [
        pytest.param("SELECT 'hunter2'", "SELECT ?", id="string"),
        pytest.param("SELECT 'it''s hunter2'", "SELECT ?", id="string-with-doubled-quote"),
        pytest.param("SELECT E'pa\\'ss hunter2'", "SELECT ?", id="escape-string"),
        pytest.param("SELECT e'\\\\', 'hunter2'", "SELECT ?, ?", id="escape-string-backslash"),
        pytest.param("SELECT U&'d\\0061t\\+000061'", "SELECT ?", id="unicode-string"),
        pytest.param("SELECT u&'x' UESCAPE '!'", "SELECT ? UESCAPE ?", id="unicode-uescape"),
        pytest.param("SELECT B'0101', b'1'", "SELECT ?, ?", id="bit-string"),
        pytest.param("SELECT X'1F', x'ff'", "SELECT ?, ?", id="hex-string"),
        pytest.param("SELECT N'national'", "SELECT ?", id="national-string"),
        pytest.param("SELECT $$s3cret$$", "SELECT ?", id="dollar"),
        pytest.param("SELECT $tag$x $$ y$tag$", "SELECT ?", id="dollar-tag"),
        pytest.param("SELECT $a$ $b$ x $b$ $a$", "SELECT ?", id="dollar-nested-tags"),
        pytest.param("SELECT 42, -7, 3.14, .5, 1., 6e23, 1.5E-3", "SELECT ?, -?, ?, ?, ?, ?, ?"),
        pytest.param("SELECT 0x1F, 0o17, 0b101, 1_000_000", "SELECT ?, ?, ?, ?", id="pg16-ints"),
        pytest.param("SELECT 4111111111111111", "SELECT ?", id="card-number"),
        pytest.param("SELECT 123abc", "SELECT ?", id="number-with-trailing-junk"),
        pytest.param("SELECT '1'::int + 2", "SELECT ?::int + ?", id="cast"),
        pytest.param("SELECT data->>'key' FROM t", "SELECT data->>? FROM t", id="json-op"),
    ],
)
def test_every_kind_of_literal_becomes_a_placeholder(query: str, shape: str) -> None:
    assert normalise(query) == shape


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("SELECT t1.col_2, t1.c3d FROM t1", id="digits-in-identifiers"),
        pytest.param('SELECT "Table 3"."x 1" FROM "Table 3"', id="quoted-identifier"),
        pytest.param('SELECT "it\'s ""quoted"""', id="quotes-inside-quoted-identifier"),
        pytest.param("SELECT * FROM t WHERE a = $1 AND b = $12", id="parameters"),
        pytest.param("SELECT a$1, b$c$ FROM t", id="dollar-inside-identifiers"),
        pytest.param("SELECT é1 FROM t", id="non-ascii-identifier"),
        pytest.param("SELECT a.b FROM s.t", id="qualified-names"),
    ],
)
def test_what_is_not_a_literal_stays_as_written(query: str) -> None:
    assert normalise(query) == query


def test_parameters_in_lists_collapse_like_placeholders() -> None:
    assert normalise("SELECT * FROM t WHERE id IN ($1, $2, $3)") == (
        "SELECT * FROM t WHERE id IN (...)"
    )


@pytest.mark.parametrize(
    ("query", "shape"),
    [
        pytest.param("SELECT 1 /* c */ + 2", "SELECT ? + ?", id="block"),
        pytest.param("SELECT 1 /* a /* nested */ 'x' */ + 2", "SELECT ? + ?", id="nested"),
        pytest.param("SELECT 1 -- note 'x'\n+ 2", "SELECT ? + ?", id="line"),
        pytest.param("SELECT 1 -- note\r+ 2", "SELECT ? + ?", id="line-cr"),
        pytest.param("SELECT '/* not a comment */'", "SELECT ?", id="in-string"),
        pytest.param("SELECT '--' || 'x'", "SELECT ? || ?", id="dashes-in-string"),
        pytest.param("SELECT a/b, a-b FROM t", "SELECT a/b, a-b FROM t", id="operators"),
    ],
)
def test_comments_go_and_only_comments(query: str, shape: str) -> None:
    assert normalise(query) == shape


@pytest.mark.parametrize(
    ("query", "shape"),
    [
        pytest.param("SELECT * FROM t WHERE id IN (1, 2, 3)", "SELECT * FROM t WHERE id IN (...)"),
        pytest.param("SELECT * FROM t WHERE id in ('a')", "SELECT * FROM t WHERE id in (...)"),
        pytest.param(
            "SELECT * FROM t WHERE id NOT IN (1,2)", "SELECT * FROM t WHERE id NOT IN (...)"
        ),
        pytest.param(
            "INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y'), (3, 'z')",
            "INSERT INTO t (a, b) VALUES (...)",
        ),
        pytest.param("INSERT INTO t VALUES (1, DEFAULT)", "INSERT INTO t VALUES (?, DEFAULT)"),
        pytest.param("SELECT JOIN (1, 2)", "SELECT JOIN (?, ?)", id="not-after-a-keyword"),
    ],
)
def test_lists_of_placeholders_collapse(query: str, shape: str) -> None:
    assert normalise(query) == shape


def test_lists_of_any_length_share_a_fingerprint() -> None:
    a = statement_of("SELECT * FROM t WHERE id IN (1, 2, 3)", None)
    b = statement_of("SELECT * FROM t WHERE id IN (7)", None)
    assert a is not None
    assert b is not None
    assert a.fingerprint == b.fingerprint


def test_whitespace_collapses_and_control_characters_go() -> None:
    query = 'SELECT\n\t a ,  "we\x07ird\x00"\r\n  FROM\u00a0t\u200b  '
    assert normalise(query) == 'SELECT a , "weird" FROM t'


def test_keyword_case_is_kept() -> None:
    assert normalise("select * From t where x = 1") == "select * From t where x = ?"


def test_a_long_statement_is_cut_with_an_ellipsis() -> None:
    query = "SELECT " + ", ".join(f"column_{i}" for i in range(100)) + " FROM t"
    text = normalise(query)
    assert len(text) == STATEMENT_LIMIT
    assert text.endswith("…")
    assert normalise(query, limit=20) == "SELECT column_0, co…"
    assert normalise("SELECT 1", limit=20) == "SELECT ?"


# --- literals never leave ---------------------------------------------------------------------


PLANTED = [
    pytest.param("ALTER ROLE app PASSWORD 'hunter2'", ("hunter2",), id="password"),
    pytest.param("SELECT E'pa\\'ss' AS x, 'swordfish'", ("pa", "ss", "swordfish"), id="e-string"),
    pytest.param("SELECT $$s3cret$$, $tag$x-tag-body$tag$", ("s3cret", "x-tag-body"), id="dollar"),
    pytest.param("SELECT * FROM cards WHERE pan = 4111111111111111", ("4111111111111111",)),
    pytest.param(DJANGO_SESSION, ("q8zv1nb0k3y5s3ss10nk3y", "2026-12-03"), id="django-session"),
    # standard_conforming_strings = off would read \' as a quote: both readings are hidden.
    pytest.param("SELECT 'C:\\dir\\' AS p, 'swordfish' AS q", ("dir", "swordfish"), id="scs"),
    pytest.param("SELECT 'a\\'', 'swordfish'", ("swordfish",), id="scs-doubled"),
    pytest.param("SELECT '/*route=''hunter2''*/'", ("hunter2",), id="tag-lookalike-literal"),
]


@pytest.mark.parametrize(("query", "secrets"), PLANTED)
def test_planted_secrets_never_appear_in_any_output(query: str, secrets: tuple[str, ...]) -> None:
    for qid in (None, 0, 1234):
        statement = statement_of(query, qid)
        assert statement is not None
        shown = [normalise(query), statement.text, statement.fingerprint, repr(statement.tags)]
        shown += list(statement.tags.values()) + list(parse_tags(query).values())
        assert not [s for s in secrets for text in shown if s in text]


@pytest.mark.parametrize(("query", "secrets"), PLANTED)
def test_planted_secrets_never_appear_when_the_statement_is_cut_anywhere(
    query: str, secrets: tuple[str, ...]
) -> None:
    # pg_stat_activity cuts at track_activity_query_size: every prefix is a possible statement.
    for cut in range(len(query) + 1):
        prefix = query[:cut]
        statement = statement_of(prefix, None)
        shown = [normalise(prefix), *parse_tags(prefix).values()]
        if statement is not None:
            shown += [statement.text, *statement.tags.values()]
        # A secret only shows if the skeleton of the statement itself spells it out.
        assert not [s for s in secrets for text in shown if s in text], prefix


@pytest.mark.parametrize(
    ("query", "shape"),
    [
        pytest.param("SELECT a FROM t WHERE p = 'hunt", "SELECT a FROM t WHERE p = ?", id="string"),
        pytest.param("SELECT E'pa\\'ss", "SELECT ?", id="e-string"),
        pytest.param("SELECT $x$ s3cret", "SELECT ?", id="dollar"),
        pytest.param("SELECT 1 /* a /* b */ 'secret", "SELECT ?", id="nested-comment"),
        pytest.param("SELECT 'a', E'b\\", "SELECT ?, ?", id="e-string-ends-with-backslash"),
        pytest.param("SELECT E'a''b AND secret", "SELECT ?", id="e-string-cut-after-doubled-quote"),
    ],
)
def test_an_unterminated_literal_or_comment_hides_everything_after_its_opening(
    query: str, shape: str
) -> None:
    assert normalise(query) == shape


TEMPLATES = [
    "SELECT * FROM t1 WHERE col_2 = {lit} LIMIT 21",
    'UPDATE "auth_user" SET "password" = {lit} WHERE "id" = $1',
    "INSERT INTO t (a, b) VALUES ({lit}, 1), (2, {lit}) /*route='%5Eapi/'*/",
    "SELECT {lit}::text AS x -- trailing\n, 2",
    "ALTER ROLE app PASSWORD {lit}",
    'SELECT f({lit}) /* {{\'a\'}} */, "Col 9" FROM "T"',
]


# A quote after an odd run of backslashes: where a plain string ends depends on a setting.
AMBIGUOUS_QUOTE = re.compile(r"(?<!\\)(?:\\\\)*\\'")


def quoted(secret: str, style: str) -> str:
    """``secret`` as a correct PostgreSQL literal (standard_conforming_strings on)."""
    if style == "plain":
        return "'" + secret.replace("'", "''") + "'"
    if style == "escape":
        return "E'" + secret.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if style == "unicode":
        return "U&'" + secret.replace("'", "''").replace("\\", "\\\\") + "'"
    return "$sec$" + secret + "$sec$"


SECRET_TEXT = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=6),
    st.text(min_size=6),
)
STYLES = st.sampled_from(["plain", "escape", "unicode", "dollar"])


@given(secret=SECRET_TEXT, style=STYLES, template=st.sampled_from(TEMPLATES))
@example(secret="it's hunter2 /* */ -- $$", style="plain", template=TEMPLATES[0])
@example(secret="back\\'slash'", style="escape", template=TEMPLATES[1])
@settings(max_examples=300, deadline=None)
def test_no_quoted_secret_ever_reaches_the_output(secret: str, style: str, template: str) -> None:
    assume(style != "dollar" or "$" not in secret)
    query = template.format(lit=quoted(secret, style))
    skeleton = template.format(lit="?")
    # A secret that the statement's own text spells out is no secret.
    assume(secret not in skeleton and secret not in normalise(skeleton))
    statement = statement_of(query, None)
    assert statement is not None
    for shown in (normalise(query), statement.text, *statement.tags.values()):
        assert secret not in shown
    # Stronger: the output does not depend on the literal at all (but for where it ends, when
    # standard_conforming_strings would decide that: then nothing after its opening is shown).
    if style == "plain" and AMBIGUOUS_QUOTE.search(quoted(secret, style)):
        same = template.split("{lit}", 1)[0] + "''"
    else:
        same = template.format(lit="''")
    assert normalise(query) == normalise(same)
    assert statement == statement_of(same, None)


@given(
    secret=SECRET_TEXT,
    style=STYLES,
    template=st.sampled_from(TEMPLATES),
    cut=st.integers(min_value=0, max_value=10_000),
)
@settings(max_examples=300, deadline=None)
def test_a_statement_cut_inside_a_literal_shows_nothing_of_it(
    secret: str, style: str, template: str, cut: int
) -> None:
    assume(style != "dollar" or "$" not in secret)
    literal = quoted(secret, style)
    head = template.split("{lit}", 1)[0].replace("{{", "{").replace("}}", "}")
    # Cut somewhere inside the first literal, after its opening quote.
    opening = literal.index("'") + 1 if style != "dollar" else len("$sec$")
    query = head + literal[: opening + cut % (len(literal) - opening)]
    assert normalise(query) == normalise(head + "''")
    visible = secret[: max(0, len(query) - len(head) - opening)]
    if len(visible) >= 6 and visible not in head:
        assert visible not in normalise(query)


@given(number=st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False)))
def test_numbers_of_any_value_share_a_shape(number: float) -> None:
    text = repr(number).lstrip("-")
    assert normalise(f"SELECT * FROM t WHERE x = {text}") == "SELECT * FROM t WHERE x = ?"


# --- tags -------------------------------------------------------------------------------------


def test_django_sqlcommenter_tags_are_kept_and_literals_stripped() -> None:
    assert parse_tags(DJANGO_SESSION) == DJANGO_TAGS
    statement = statement_of(DJANGO_SESSION, None)
    assert isinstance(statement, Statement)
    assert normalise(DJANGO_SESSION, limit=1000) == DJANGO_SESSION_SHAPE
    # Longer than a status line holds: cut, and said to be.
    assert len(statement.text) == STATEMENT_LIMIT
    assert statement.text == DJANGO_SESSION_SHAPE[: STATEMENT_LIMIT - 1].rstrip() + "…"
    assert statement.tags == DJANGO_TAGS
    assert list(statement.tags) == ["route", "controller", "framework"]


@pytest.mark.parametrize(
    ("comment", "tags"),
    [
        pytest.param(
            "/*action='index',controller='users',framework='django%3A5.0.1',"
            "route='%5Esync/%24',traceparent='00-5bd66ef5095369c7b0d1f8f4bd33716a-c532cb4098ac3dd2-01',"
            "tracestate='congo%3Dt61rcWkgMzE'*/",
            {
                "route": "^sync/$",
                "controller": "users",
                "action": "index",
                "framework": "django:5.0.1",
            },
            id="sqlcommenter",
        ),
        pytest.param(
            "/*controller='index',framework='django%%3A5.0.1'*/",
            {"controller": "index", "framework": "django:5.0.1"},
            id="sqlcommenter-percent-doubled",
        ),
        pytest.param(
            "/* route='%2Fa\\'b' , db_driver='psycopg' */",
            {"route": "/a'b"},
            id="sqlcommenter-spaces-and-escaped-quote",
        ),
        pytest.param(
            "/*application:Shop,controller:users,action:index,line:/app/x.rb:12*/",
            {"controller": "users", "action": "index", "application": "Shop"},
            id="marginalia",
        ),
        pytest.param("/* just a note */", {}, id="prose"),
        pytest.param("/*route='unterminated*/", {}, id="malformed-sqlcommenter"),
        pytest.param("/*route=unquoted*/", {}, id="unquoted"),
        pytest.param("/*traceparent='00-1-2-01'*/", {}, id="per-request-only"),
        pytest.param("/*route=''*/", {}, id="empty-value"),
        pytest.param("/*controller='a%0Ab%07c%E2%80%8Bd'*/", {"controller": "a bcd"}, id="control"),
    ],
)
def test_tags_are_read_from_comments(comment: str, tags: dict[str, str]) -> None:
    assert parse_tags(f"SELECT 1 {comment}") == tags


def test_tag_values_are_bounded() -> None:
    tags = parse_tags(f"SELECT 1 /*route='{'r' * 5000}'*/")
    assert tags == {"route": "r" * fingerprint.TAG_VALUE_LIMIT}


def test_tags_inside_literals_or_cut_comments_are_not_tags() -> None:
    assert parse_tags("SELECT '/*route=''x''*/', $$ /*controller='y'*/ $$") == {}
    assert parse_tags("SELECT 1 /*route='%5Eapi/',controller='us") == {}


def test_tags_are_in_tag_keys_order() -> None:
    tags = parse_tags("SELECT 1 /*application='a',action='b',framework='c',route='d'*/")
    assert list(tags) == [k for k in TAG_KEYS if k in tags]


# --- statements and fingerprints --------------------------------------------------------------


def test_a_django_count_and_a_lookup_are_shown_as_written_but_for_literals() -> None:
    count = statement_of('SELECT COUNT(*) AS "__count" FROM "auth_user"', None)
    lookup = statement_of(
        'SELECT "auth_user"."id", "auth_user"."username" FROM "auth_user"'
        ' WHERE "auth_user"."id" = 1 LIMIT 21',
        None,
    )
    assert count is not None
    assert lookup is not None
    assert count.text == 'SELECT COUNT(*) AS "__count" FROM "auth_user"'
    assert lookup.text == (
        'SELECT "auth_user"."id", "auth_user"."username" FROM "auth_user"'
        ' WHERE "auth_user"."id" = ? LIMIT ?'
    )
    assert re.fullmatch(r"[0-9a-f]{16}", count.fingerprint)
    assert count.fingerprint != lookup.fingerprint


@pytest.mark.parametrize("query", ["", "   \n\t", HIDDEN, f" {HIDDEN} ", "/* only a comment */"])
def test_no_statement_to_show(query: str) -> None:
    assert statement_of(query, None) is None
    assert statement_of(query, 42) is None


def test_the_same_shape_with_other_literals_has_one_fingerprint() -> None:
    a = statement_of("SELECT * FROM t WHERE a = 'x' AND b = 1 /*route='r'*/", None)
    b = statement_of("SELECT  *  FROM t WHERE a = E'yy' AND b = 2.5 -- other\n/*route='r'*/", None)
    assert a is not None
    assert b is not None
    assert a.fingerprint == b.fingerprint


def test_other_tags_make_another_fingerprint() -> None:
    base = "SELECT * FROM t WHERE a = 1 "
    shapes = [
        statement_of(base, None),
        statement_of(base + "/*route='a'*/", None),
        statement_of(base + "/*route='b'*/", None),
        statement_of(base + "/*controller='a'*/", None),
        statement_of(base + "/*route='a',controller='a'*/", None),
    ]
    assert len({s.fingerprint for s in shapes if s is not None}) == len(shapes)
    # The same holds when PostgreSQL keys the statement: query_id ignores comments.
    with_id = [statement_of(base + c, 77) for c in ("", "/*route='a'*/", "/*route='b'*/")]
    assert len({s.fingerprint for s in with_id if s is not None}) == 3


def test_the_query_id_is_the_key_when_postgres_computed_one() -> None:
    a = statement_of("SELECT * FROM t WHERE a = 1", 123)
    b = statement_of("SELECT * FROM t WHERE a = 1 AND 1 = 1", 123)
    c = statement_of("SELECT * FROM t WHERE a = 1", 124)
    assert a is not None
    assert b is not None
    assert c is not None
    assert a.fingerprint == b.fingerprint != c.fingerprint
    # query_id 0 is "not computed": the text is the key.
    assert statement_of("SELECT 1", 0) == statement_of("SELECT 2", None)


def test_untracked_and_unrelated_per_request_tags_do_not_split_a_shape() -> None:
    a = statement_of("SELECT 1 /*route='r',traceparent='00-aa-bb-01'*/", None)
    b = statement_of("SELECT 1 /*route='r',traceparent='00-cc-dd-01'*/", None)
    assert a == b


def test_rank_statements_counts_shapes_most_frequent_first() -> None:
    a = statement_of("SELECT a FROM t WHERE x = 1", None)
    b = statement_of("SELECT b FROM t", None)
    c = statement_of("SELECT c FROM t", None)
    d = statement_of("SELECT d FROM t", None)
    assert a is not None
    assert b is not None
    assert c is not None
    assert d is not None
    a2 = statement_of("SELECT a FROM t WHERE x = 2", None)
    ranked = rank_statements([b, a, None, a2, c, b, a, d, d], top=3)
    assert ranked == [(a, 3), (b, 2), (d, 2)]
    assert rank_statements([None]) == []
