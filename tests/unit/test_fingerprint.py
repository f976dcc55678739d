"""Statement shapes: every literal goes, the code's shape and its tags stay (policy.fingerprint)."""

from __future__ import annotations

import re
import urllib.parse

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

WITHHELD = "(withheld)"  # fingerprint.TAG_WITHHELD, spelled out so a change of it is seen

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
    pytest.param(
        "SELECT a FROM t /* retry of 'hunter2' */ WHERE b = 'swordfish'",
        ("hunter2", "swordfish"),
        id="quoted-string-in-a-comment",
    ),
    pytest.param(
        "SELECT a FROM t /*action:'reset hunter2',controller:'x=swordfish'*/",
        ("hunter2", "swordfish"),
        id="quoted-marginalia-values",
    ),
    pytest.param(
        "SELECT a FROM t /* action:reset password=hunter2 */", ("hunter2",), id="marginalia-secret"
    ),
    pytest.param(
        "SELECT a FROM t /*route='%27%20OR%20password%3Dhunter2--'*/", ("hunter2",), id="route"
    ),
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
            {"route": WITHHELD, "db_driver": "psycopg"},
            id="sqlcommenter-spaces-and-escaped-quote",
        ),
        pytest.param(
            "/*application:Shop,controller:users,action:index,line:/app/x.rb:12*/",
            {
                "controller": "users",
                "action": "index",
                "line": "/app/x.rb:12",
                "application": "Shop",
            },
            id="marginalia",
        ),
        pytest.param("/* just a note */", {}, id="prose"),
        pytest.param("/*route='unterminated*/", {}, id="malformed-sqlcommenter"),
        pytest.param("/*route=unquoted*/", {}, id="unquoted"),
        pytest.param("/*traceparent='00-1-2-01'*/", {}, id="per-request-only"),
        pytest.param("/*route=''*/", {}, id="empty-value"),
        pytest.param(
            "/*controller='a%0Ab%07c%E2%80%8Bd'*/", {"controller": WITHHELD}, id="control"
        ),
        pytest.param(
            "/*application='Shop',controller='users',action='index',job='SyncJob',"
            "namespaced_controller='admin/users',framework='rails%3A7.2',db_driver='pg%3A1.5'*/",
            {
                "controller": "users",
                "namespaced_controller": "admin/users",
                "action": "index",
                "job": "SyncJob",
                "framework": "rails:7.2",
                "application": "Shop",
                "db_driver": "pg:1.5",
            },
            id="rails-query-logs-sqlcommenter",
        ),
        pytest.param(
            "/*app_name='users',controller='user_detail',db_driver='django.db.backends.postgresql',"
            "framework='django%3A4.2.0',route='users/%3Cint%3Aid%3E/',"
            "traceparent='00-5bd66ef5095369c7b0d1f8f4bd33716a-c532cb4098ac3dd2-01'*/",
            {
                "route": "users/<int:id>/",
                "controller": "user_detail",
                "framework": "django:4.2.0",
                "app_name": "users",
                "db_driver": "django.db.backends.postgresql",
            },
            id="django-sqlcommenter-all-options",
        ),
        pytest.param(
            "/*application:Shop,controller_with_namespace:Admin::UsersController,action:index,"
            "line:/app/controllers/admin/users_controller.rb:12:in `index'*/",
            {
                "controller_with_namespace": "Admin::UsersController",
                "action": "index",
                "line": "/app/controllers/admin/users_controller.rb:12",
                "application": "Shop",
            },
            id="marginalia-line",
        ),
        pytest.param(
            "/*application:'Shop',controller:'users',action:'index'*/",
            {"controller": "users", "action": "index", "application": "Shop"},
            id="marginalia-quoted-values",
        ),
        pytest.param(
            "/*action='index',source_location='app%2Fmodels%2Fuser.rb%3A7%3Ain%20%27User%23x%27'*/",
            {"action": "index", "source_location": "app/models/user.rb:7"},
            id="query-logs-source-location",
        ),
    ],
)
def test_tags_are_read_from_comments(comment: str, tags: dict[str, str]) -> None:
    assert parse_tags(f"SELECT 1 {comment}") == tags


def test_tag_values_are_bounded() -> None:
    limit = fingerprint.TAG_VALUE_LIMIT
    assert parse_tags(f"SELECT 1 /*route='{'r' * limit}'*/") == {"route": "r" * limit}
    # Longer is no name of code: withheld, not cut (a cut value could end inside a secret).
    assert parse_tags(f"SELECT 1 /*route='{'r' * (limit + 1)}'*/") == {"route": WITHHELD}
    assert parse_tags(f"SELECT 1 /*action:{'a' * 5000}*/") == {"action": WITHHELD}


def test_tags_inside_literals_or_cut_comments_are_not_tags() -> None:
    assert parse_tags("SELECT '/*route=''x''*/', $$ /*controller='y'*/ $$") == {}
    assert parse_tags("SELECT 1 /*route='%5Eapi/',controller='us") == {}


def test_tags_are_in_tag_keys_order() -> None:
    tags = parse_tags("SELECT 1 /*application='a',action='b',framework='c',route='d'*/")
    assert list(tags) == [k for k in TAG_KEYS if k in tags]


# --- tags never carry a secret ----------------------------------------------------------------


def shown_of(query: str) -> list[str]:
    """Everything a statement puts in status, Events, metrics and the CLI."""
    statement = statement_of(query, None)
    assert statement is not None
    tags = parse_tags(query)
    return [
        statement.text,
        statement.fingerprint,
        repr(statement.tags),
        repr(tags),
        *(f"{k}={v}" for k, v in statement.tags.items()),
    ]


def test_a_marginalia_comment_with_a_password_shows_no_password() -> None:
    # Found by reading: "action:reset password=hunter2" was kept whole as the action.
    query = "SELECT * FROM users WHERE id = $1 /* action:reset password=hunter2 */"
    assert not [s for s in shown_of(query) if "hunter2" in s or "password" in s]
    statement = statement_of(query, None)
    assert statement is not None
    assert statement.tags == {"action": WITHHELD}


@pytest.mark.parametrize(
    "comment",
    [
        pytest.param("/*route='%27%20OR%20password%3Dhunter2--'*/", id="quote-and-equals"),
        pytest.param("/*route='%2Fa%0Ahunter2'*/", id="newline"),
        pytest.param("/*route='%2Fa%20hunter2'*/", id="space"),
        pytest.param("/*route='%2Fa%22hunter2%22'*/", id="double-quote"),
        pytest.param("/*route='%2Fa%5C%27hunter2'*/", id="backslash-quote"),
        pytest.param("/*route='%2Fa%25hunter2'*/", id="percent"),
        pytest.param("/*route='%2Fa%E2%80%AEhunter2'*/", id="bidi-override"),
        pytest.param("/*route='%2Fa%FFhunter2'*/", id="not-utf8"),
        pytest.param("/*route='%2Fa%2Cb%3Dhunter2'*/", id="comma-equals"),
        pytest.param("/*route='%2Freset-password%2Fhunter2'*/", id="credential-word"),
    ],
)
def test_a_route_that_decodes_to_anything_but_a_path_is_withheld(comment: str) -> None:
    # Found by reading: the route was URL-decoded into status and Events whatever it decoded to.
    query = f"SELECT 1 {comment}"
    assert not [s for s in shown_of(query) if "hunter2" in s]
    assert parse_tags(query) == {"route": WITHHELD}


@pytest.mark.parametrize(
    ("route", "kept"),
    [
        pytest.param("%2Fusers%2F42%3Ftoken%3Dhunter2", "/users/42", id="query-string"),
        pytest.param("%2Fcallback%23access_token%3Dhunter2", "/callback", id="fragment"),
        pytest.param("%2Fcart%3Bjsessionid%3Dhunter2", "/cart", id="path-parameter"),
        pytest.param("%3Ftoken%3Dhunter2", WITHHELD, id="only-a-query-string"),
        # A regular expression's group is no query string: withheld, not cut into "^users/(".
        pytest.param("%5Eusers%2F%28%3FP%3Cpk%3E%5B0-9%5D%2B%29%2F%24", WITHHELD, id="regex-group"),
    ],
)
def test_a_route_loses_its_query_string(route: str, kept: str) -> None:
    query = f"SELECT 1 /*route='{route}'*/"
    assert not [s for s in shown_of(query) if "hunter2" in s]
    assert parse_tags(query) == {"route": kept}


@pytest.mark.parametrize(
    "route",
    [
        "^sync/$",
        "users/<int:id>/",
        "/api/v1/orders/{order_id}",
        "/users/:id(.:format)",
        "/files/*path",
        "^page/[0-9]+/$",
        "~/home",
    ],
)
def test_route_patterns_of_real_frameworks_are_kept(route: str) -> None:
    encoded = urllib.parse.quote(route, safe="")
    assert parse_tags(f"SELECT 1 /*route='{encoded}'*/") == {"route": route}


@pytest.mark.parametrize(
    ("comment", "tags"),
    [
        pytest.param("/*password='hunter2'*/", {}, id="credential-key"),
        pytest.param("/*db_password:hunter2*/", {}, id="credential-key-marginalia"),
        pytest.param("/*request_path:/reset?token=hunter2*/", {}, id="unknown-key"),
        pytest.param("/*tenant_id='hunter2',action='index'*/", {"action": "index"}, id="custom"),
        pytest.param("/*controller='pass%3Dhunter2'*/", {"controller": WITHHELD}, id="equals"),
        pytest.param("/*controller='hunter2 x'*/", {"controller": WITHHELD}, id="space"),
        pytest.param("/*action:'it\\'s hunter2'*/", {"action": WITHHELD}, id="quote"),
        pytest.param("/*action='secret_hunter2'*/", {"action": WITHHELD}, id="secret-word"),
        pytest.param("/*action='apiKey_hunter2'*/", {"action": WITHHELD}, id="camel-case-key"),
        pytest.param("/*job='authTokenhunter2'*/", {"job": WITHHELD}, id="token-word"),
        pytest.param("/*action='pwd-hunter2'*/", {"action": WITHHELD}, id="pwd"),
        pytest.param("/*action='hunter2abcdef01234567'*/", {"action": WITHHELD}, id="random"),
        pytest.param("/*action='q8zv1nb0k3y5s3ss10nk3y'*/", {"action": WITHHELD}, id="random-2"),
        pytest.param("/*action='x4111111111111111'*/", {"action": WITHHELD}, id="digits"),
        pytest.param(
            "/*action='123e4567-e89b-12d3-a456-426614174000'*/", {"action": WITHHELD}, id="uuid"
        ),
        pytest.param("/*line:/app/x.rb:12:in 'reset' hunter2*/", {"line": "/app/x.rb:12"}, id="l"),
        pytest.param("/*line:hunter2 x.rb*/", {"line": WITHHELD}, id="line-not-a-line"),
    ],
)
def test_unknown_keys_are_dropped_and_unsafe_values_withheld(
    comment: str, tags: dict[str, str]
) -> None:
    query = f"SELECT 1 {comment}"
    assert parse_tags(query) == tags
    assert not [s for s in shown_of(query) if "hunter2" in s]


@pytest.mark.parametrize(
    "value",
    [
        "authors",
        "monkey",
        "keyword_search",
        "passenger",
        "Keycloak",
        "tokyo",
        "S3UploadsController",
        "Admin::ReportsGenerationJob",
    ],
)
def test_words_that_only_contain_a_credential_word_are_kept(value: str) -> None:
    assert parse_tags(f"SELECT 1 /*controller='{value}'*/") == {"controller": value}


def test_a_withheld_tag_is_one_shape_whatever_it_withheld() -> None:
    a = statement_of("SELECT 1 /*route='%2Fa%3Fsession%3D1',action='x%20hunter2'*/", None)
    b = statement_of("SELECT 1 /*route='%2Fa%3Fsession%3D2',action='x%20swordfish'*/", None)
    c = statement_of("SELECT 1 /*route='%2Fa',action='x'*/", None)
    assert a is not None
    assert b is not None
    assert c is not None
    assert a == b
    assert a.tags == {"route": "/a", "action": WITHHELD}
    # ...but it says that a tag was withheld: another shape than the same statement untagged.
    assert a.fingerprint != c.fingerprint


def test_kept_tags_pass_the_rules_again_unchanged() -> None:
    # What a status holds can be checked again (by whoever reads it) without changing it.
    tags = parse_tags(
        "SELECT 1 /*route='%2Fa%3Fx',controller='users',framework='django%3A5.0.1',"
        "action='a%20b'*/ /*line:/app/x.rb:3:in `y'*/"
    )
    assert tags == {
        "route": "/a",
        "controller": "users",
        "action": WITHHELD,
        "line": "/app/x.rb:3",
        "framework": "django:5.0.1",
    }
    assert fingerprint.safe_tags(tags) == tags
    assert fingerprint.safe_tags({"route": "/a b", "password": "x", "action": "ok"}) == {
        "route": WITHHELD,
        "action": "ok",
    }


SECRET_TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=6, max_size=20
).map(lambda s: "zq" + s)
# Characters that never belong in a tag value: each one makes its value withheld.
UNSAFE_SEPARATORS = [" ", "=", "'", '"', "&", "\n", "\t", "%", "`", "\\", "!", "|", ",", "\x00"]
CREDENTIAL_PREFIXES = ["password_", "passwd-", "Secret", "token.", "api_key_", "authToken", "pwd/"]
UNKNOWN_KEYS = ["password", "db_password", "api_key", "token", "request_id", "x", "auth"]


@st.composite
def tagged_with_a_secret(draw: st.DrawFn) -> tuple[str, str, str]:
    """A statement with a comment (sqlcommenter, Marginalia, quoted Marginalia) carrying a secret:
    as an unknown or credential key's value, or inside a known key's value that is no token."""
    secret = draw(SECRET_TOKEN)
    key = draw(st.sampled_from([*TAG_KEYS, *UNKNOWN_KEYS]))
    word = draw(st.sampled_from(["reset", "index", "/users/", "a.b", ""]))
    how = draw(st.sampled_from(["separator", "credential", "query", "plain"]))
    if how == "separator":
        # Between two words (space around a value is no part of it).
        value = (word or "x") + draw(st.sampled_from(UNSAFE_SEPARATORS)) + secret
    elif how == "credential":
        value = f"{word}_{draw(st.sampled_from(CREDENTIAL_PREFIXES))}{secret}"
    elif how == "query":
        value = word + draw(st.sampled_from(["?", "#", ";"])) + secret
        if key != "route":
            key = draw(st.sampled_from(UNKNOWN_KEYS))
    else:
        value = secret
        key = draw(st.sampled_from(UNKNOWN_KEYS))
    style = draw(st.sampled_from(["sqlcommenter", "marginalia", "marginalia-quoted"]))
    if style == "marginalia" and ("," in value or "\n" in value or "'" in value):
        style = "marginalia-quoted"
    other = "controller='users'" if style == "sqlcommenter" else "controller:users"
    if style == "sqlcommenter":
        escaped = urllib.parse.quote(value, safe="").replace("'", "\\'")
        pair = f"{urllib.parse.quote(key, safe='')}='{escaped}'"
    elif style == "marginalia":
        pair = f"{key}:{value}"
    else:
        pair = f"{key}:'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    pairs = draw(st.permutations([pair, other]))
    return f"SELECT a FROM t WHERE b = $1 /*{','.join(pairs)}*/", secret, key


@given(tagged_with_a_secret())
@example(("SELECT 1 /* action:reset password=zqhunter2 */", "zqhunter2", "action"))
@example(("SELECT 1 /*route='%27%20OR%20password%3Dzqhunter2'*/", "zqhunter2", "route"))
@settings(max_examples=500, deadline=None)
def test_no_secret_in_a_comment_ever_reaches_the_output(case: tuple[str, str, str]) -> None:
    query, secret, key = case
    assert not [s for s in shown_of(query) if secret in s]
    # The comment's well-formed pair is still read: the property is not met by reading nothing.
    if key != "controller" and "controller" in query:
        assert parse_tags(query).get("controller") == "users"


SAFE_SHOWN = re.compile(rf"[A-Za-z0-9_.:/@~^$*+<>{{}}()\[\]-]{{1,{fingerprint.TAG_VALUE_LIMIT}}}")


@given(
    key=st.sampled_from(TAG_KEYS),
    value=st.text(max_size=120),
    style=st.sampled_from(["sqlcommenter", "marginalia-quoted", "noise"]),
)
@settings(max_examples=500, deadline=None)
def test_every_shown_tag_value_is_a_safe_token(key: str, value: str, style: str) -> None:
    # Whatever a known key's value holds, what is shown is the marker or a bounded run of safe
    # characters; no other key is ever shown.
    if style == "sqlcommenter":
        body = f"{key}='" + urllib.parse.quote(value, safe="").replace("'", "\\'") + "'"
    elif style == "marginalia-quoted":
        body = f"{key}:'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    else:
        body = value.replace("*/", "")
    for shown_key, shown in parse_tags(f"SELECT 1 /*{body}*/").items():
        assert shown_key in TAG_KEYS
        assert shown == WITHHELD or SAFE_SHOWN.fullmatch(shown)


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
