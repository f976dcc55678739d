"""The shape of a backend's last statement: what a leaking workload last ran, with no literal in it.

Pure: no I/O, no clock; every input is an argument.

Why: "Deployment/api leaks 3 connections a minute" tells an operator *who* leaks; the statement
its abandoned connections last ran tells a developer *where* (the view that opened a transaction
and never closed it, the task that forgot to return its connection). ``pg_stat_activity.query``
holds that statement, but as the client sent it: with its literals, and a literal can be a
password (``ALTER ROLE ... PASSWORD '...'``), a token or a card number. So the text is normalised
before anything shows it: every literal becomes ``?``, comments go, lists of placeholders collapse
(``IN (?, ?, ?)`` and ``IN (?)`` are the same place in the code), and what is left is cut to a
length a status field, an Event or a terminal line can hold.

The lexer follows PostgreSQL's (``scan.l``) where it decides what is a literal: string constants
(``'...'`` with ``''``, ``E'...'`` with backslash escapes, ``U&'...'``, ``B'...'``, ``X'...'``,
``N'...'``), dollar-quoted strings (``$$...$$``, ``$tag$...$tag$``; ``$1`` is a parameter and
stays), numbers (``42``, ``1.5e-3``, ``0x1F``, ``1_000``; a digit inside an identifier such as
``t1`` is no number), ``/* */`` comments (nested) and ``--`` comments. Quoted identifiers
(``"Table 3"``) are names, not data, and stay as written.

What it accepts, erring always on the side of hiding:

- ``pg_stat_activity`` cuts the text at ``track_activity_query_size`` bytes, so the last literal or
  comment may have no end: everything from its opening to the end is dropped.
- With ``standard_conforming_strings = off`` (not the default since PostgreSQL 9.1) a backslash
  escapes a quote in a plain ``'...'`` string, so where such a string ends depends on a setting the
  text does not carry. A plain string whose quote follows an odd run of backslashes is read both
  ways by nobody: everything from its opening to the end is dropped.
- Tags come from comments only (sqlcommenter ``key='value'`` pairs, Rails Marginalia and
  QueryLogs ``key:value`` pairs), never from inside a literal, and only the keys in ``TAG_KEYS``:
  they name code (a route pattern, a controller), where ``traceparent`` and friends are per
  request and an app's own keys (``request_id``, ``tenant_id``, ``password``) may hold anything.
- A comment is the app's text, not PostgreSQL's: nothing stops it from holding a literal
  (``/* action:reset password=hunter2 */``), and a URL-decoded value can be any text at all
  (``%27%20OR%20password%3D...``). So a tag's value is shown only when it can name code and
  nothing else (``tag_value``: a bounded token of safe characters, a route cut before its query
  string, no word naming a credential, nothing random-looking); any other shows as
  ``TAG_WITHHELD``, which the fingerprint keeps (the shape says a tag was withheld) but never a
  character of what it withheld.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# What pg_stat_activity.query shows of another role's backend without pg_read_all_stats.
HIDDEN = "<insufficient privilege>"
# What it shows when track_activities is off: no statement either.
_NOT_STATEMENTS = frozenset({HIDDEN, "<command string not enabled>"})
# Characters of a normalised statement shown (status, Events, CLI): a line, not a page.
STATEMENT_LIMIT = 200
# Characters of a normalised statement that take part in its fingerprint when PostgreSQL gives no
# query_id: long enough that two statements differing only past the cut are rare.
FINGERPRINT_TEXT_LIMIT = 10_000
# The tags kept, in this order: the keys of sqlcommenter (Django's middleware, Rails' QueryLogs,
# Express, ...) and Rails' Marginalia that name code, not a request or a connection.
TAG_KEYS = (
    "route",
    "controller",
    "namespaced_controller",  # QueryLogs: admin/users
    "controller_with_namespace",  # Marginalia: Admin::UsersController
    "action",
    "job",
    "line",  # Marginalia: the file and line that ran the statement
    "source_location",  # QueryLogs: the same
    "framework",
    "application",
    "app_name",  # Django's sqlcommenter: the URL namespace's app
    "db_driver",
)
# Characters of a tag value at most: a route pattern or a controller name, not a document.
TAG_VALUE_LIMIT = 100
# What a known tag shows when its value is no name of code (see ``tag_value``): the shape says a
# tag was withheld, never what it held.
TAG_WITHHELD = "(withheld)"
# Hex characters of the sha256 kept as a fingerprint: 64 bits, unique among a server's shapes.
FINGERPRINT_HEX_CHARS = 16
# Statement shapes shown per group of backends (CLI, status): the few that matter.
TOP_STATEMENTS = 3

ELLIPSIS = "…"
PLACEHOLDER = "?"
LIST = "(...)"


@dataclass(frozen=True, kw_only=True)
class Statement:
    """The shape of a statement, safe to show: literals replaced, tags safe tokens or withheld."""

    fingerprint: str  # 16 lowercase hex chars: stable id of (shape, kept tags)
    text: str  # normalised statement, <= STATEMENT_LIMIT chars (ends with "…" when cut)
    # Known tags only, in TAG_KEYS order; a value is a safe token (``tag_value``) or TAG_WITHHELD.
    tags: Mapping[str, str] = field(hash=False)


# --- lexer --------------------------------------------------------------------------------------

# PostgreSQL's identifier characters: letters, digits, _, $ (not first) and any non-ASCII.
_IDENT = re.compile(r"[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*")
# A number, with what PostgreSQL would call trailing junk (``123abc``) taken along: all of it goes.
_NUMBER = re.compile(
    r"(?:0[xX][0-9A-Fa-f_]+|0[oO][0-7_]+|0[bB][01_]+"
    r"|(?:\d[\d_]*(?:\.(?!\.)[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d[\d_]*)?)"
    r"[A-Za-z0-9_$\u0080-\U0010ffff]*"
)
_PARAMETER = re.compile(r"\$\d+")
_DOLLAR_OPEN = re.compile(r"\$(?:[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_\u0080-\U0010ffff]*)?\$")
# The body and closing quote of an E'...' string: backslash escapes, and '' too. Possessive: a
# string with no end must not be ended by backtracking to the first quote of a ''.
_E_STRING_REST = re.compile(r"(?:[^'\\]|\\.|'')*+'", re.DOTALL)
# Everything that cannot start a literal, comment, identifier or parameter.
_PLAIN = re.compile(r"[^A-Za-z0-9_$\u0080-\U0010ffff'\"/\-.]+")
_COMMENT_EDGE = re.compile(r"/\*|\*/")
_LINE_END = re.compile(r"[\n\r]")
# Prefixes of string constants: E (escapes), B and X (bit strings), N (national); U& apart.
_STRING_PREFIXES = frozenset("EeBbXxNn")


@dataclass
class _Scan:
    """A statement split into what may be shown and what may not."""

    pieces: list[str] = field(default_factory=list)  # the statement with literals as "?"
    comments: list[str] = field(default_factory=list)  # bodies of complete /* */ comments


def _plain_string_end(query: str, start: int) -> int | None:
    """Index after the closing quote of the plain string opened at ``start``; None: no safe end.

    None when the string has no end (a cut statement) and when a quote in it follows an odd run of
    backslashes: under ``standard_conforming_strings = off`` that quote is escaped, under ``on`` it
    is not, and the two readings end the string in different places.
    """
    i = start + 1
    while True:
        j = query.find("'", i)
        if j < 0:
            return None
        run = 0
        while j - run - 1 > start and query[j - run - 1] == "\\":
            run += 1
        if run % 2:
            return None
        if query.startswith("''", j):
            i = j + 2
            continue
        return j + 1


def _comment_end(query: str, start: int) -> int | None:
    """Index after the ``*/`` closing the comment opened at ``start`` (nested, as PostgreSQL)."""
    depth = 0
    pos = start
    while (m := _COMMENT_EDGE.search(query, pos)) is not None:
        depth += 1 if m.group() == "/*" else -1
        pos = m.end()
        if depth == 0:
            return pos
    return None


def _scan(query: str) -> _Scan:
    """Split ``query`` into showable pieces (literals as ``?``) and comment bodies.

    An unterminated literal or comment ends the scan: nothing after its opening is kept.
    """
    out = _Scan()
    n = len(query)
    pos = 0
    while pos < n:
        c = query[pos]
        if (m := _PLAIN.match(query, pos)) is not None:
            out.pieces.append(m.group())
            pos = m.end()
        elif c == "'":
            end = _plain_string_end(query, pos)
            out.pieces.append(PLACEHOLDER)
            if end is None:
                break
            pos = end
        elif c == '"':
            end = query.find('"', pos + 1)
            while end >= 0 and query.startswith('""', end):
                end = query.find('"', end + 2)
            # A name cut by the length limit is still a name: shown as far as it goes.
            stop = n if end < 0 else end + 1
            out.pieces.append(query[pos:stop])
            pos = stop
        elif query.startswith("--", pos):
            m = _LINE_END.search(query, pos)
            pos = n if m is None else m.end()
            out.pieces.append(" ")
        elif query.startswith("/*", pos):
            end = _comment_end(query, pos)
            if end is None:
                break
            out.comments.append(query[pos + 2 : end - 2])
            out.pieces.append(" ")
            pos = end
        elif c == "$":
            if (m := _PARAMETER.match(query, pos)) is not None:
                out.pieces.append(m.group())
                pos = m.end()
            elif (m := _DOLLAR_OPEN.match(query, pos)) is not None:
                end = query.find(m.group(), m.end())
                out.pieces.append(PLACEHOLDER)
                if end < 0:
                    break
                pos = end + len(m.group())
            else:
                out.pieces.append(c)
                pos += 1
        elif (m := _NUMBER.match(query, pos)) is not None:
            out.pieces.append(PLACEHOLDER)
            pos = m.end()
        elif (m := _IDENT.match(query, pos)) is not None:
            word = m.group()
            after = m.end()
            if word in _STRING_PREFIXES and query.startswith("'", after):
                # E'...' reads backslash escapes whatever the server's settings.
                if word in ("E", "e"):
                    rest = _E_STRING_REST.match(query, after + 1)
                    end = None if rest is None else rest.end()
                else:
                    end = _plain_string_end(query, after)
                out.pieces.append(PLACEHOLDER)
                if end is None:
                    break
                pos = end
            elif word in ("U", "u") and query.startswith("&'", after):
                end = _plain_string_end(query, after + 1)
                out.pieces.append(PLACEHOLDER)
                if end is None:
                    break
                pos = end
            else:
                out.pieces.append(word)
                pos = after
        else:
            # A lone "-", "/" or "." (an operator or a qualifier): shown as it is.
            out.pieces.append(c)
            pos += 1
    return out


# --- normalisation ------------------------------------------------------------------------------

_SPACE = re.compile(r"\s+")
_ITEM = r"[-+]?(?:\?|\$\d+)"
_TUPLE = rf"\(\s*{_ITEM}(?:\s*,\s*{_ITEM})*\s*\)"
# IN (?, ?) and VALUES (?, ?), (?, ?): one list whatever its length.
_PLACEHOLDER_LIST = re.compile(
    rf"\b(IN|VALUES)\s*{_TUPLE}(?:\s*,\s*{_TUPLE})*", re.IGNORECASE | re.ASCII
)


def _printable(text: str) -> str:
    """``text`` on one line: whitespace runs as one space, other unprintable characters gone."""
    spaced = _SPACE.sub(" ", text)
    return "".join(ch for ch in spaced if ch.isprintable())


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: max(limit - 1, 0)].rstrip() + ELLIPSIS


def _shape(scan: _Scan, limit: int) -> str:
    text = _printable("".join(scan.pieces))
    text = _PLACEHOLDER_LIST.sub(lambda m: f"{m.group(1)} {LIST}", text)
    return _cut(text.strip(), limit)


def normalise(query: str, *, limit: int = STATEMENT_LIMIT) -> str:
    """Return the shape of ``query``: literals as ``?``, no comments, one line, at most ``limit``.

    Keyword case is kept as written. Lists of placeholders collapse to ``(...)`` so the same code
    with lists of different lengths has one shape. Safe to show: no literal of ``query`` survives,
    even when ``query`` was cut in the middle of one (see the module docstring).

    Args:
        query: a statement as ``pg_stat_activity.query`` shows it.
        limit: characters kept; a longer shape is cut and ends with "…".

    Returns:
        The normalised statement ("" when nothing but comments and space).
    """
    return _shape(_scan(query), limit)


# --- tags ---------------------------------------------------------------------------------------

# A sqlcommenter pair: key='value', both URL-encoded, ' in the value escaped with a backslash.
_SQLCOMMENTER_PAIR = r"\s*([^\s=,']+)\s*=\s*'((?:[^'\\]|\\.)*+)'\s*"
_SQLCOMMENTER = re.compile(rf"{_SQLCOMMENTER_PAIR}(?:,{_SQLCOMMENTER_PAIR})*", re.DOTALL)
_SQLCOMMENTER_PAIRS = re.compile(_SQLCOMMENTER_PAIR, re.DOTALL)
# A Marginalia (or ActiveRecord QueryLogs :legacy) pair: key:value, the value as it is or, with
# Marginalia's quote_values, 'value' with ' escaped by a backslash. Possessive: linear in the body.
_MARGINALIA_KEY = re.compile(r"\s*+([A-Za-z_][A-Za-z0-9_]*+)\s*+:", re.ASCII)
_MARGINALIA_QUOTED = re.compile(r"\s*+'((?:[^'\\]|\\.)*+)'\s*+(?=,|\Z)", re.DOTALL)
_BACKSLASH_ESCAPE = re.compile(r"\\(.)", re.DOTALL)

# What a kept value may hold. ASCII only: no look-alike letters, no bidirectional controls.
# A token names code (a controller, an action, a job, a framework and its version, a driver).
_TOKEN = re.compile(r"[A-Za-z0-9_.:/@-]++", re.ASCII)
# A path names a route pattern (Django's ``^sync/$`` and ``users/<int:id>/``, Flask's
# ``<int:id>``, Express's and Rails' ``:id(.:format)`` and ``*path``, OpenAPI's ``{id}``) or a file.
_PATH = re.compile(r"[A-Za-z0-9_.:/@~^$*+<>{}()\[\]-]++", re.ASCII)
# Where a URL's path ends: a query string, a fragment, a path parameter (``;jsessionid=``).
_PATH_END = re.compile(r"[?#;]")
# A Ruby caller line (Marginalia's ``line``, QueryLogs' ``source_location``): the file and line
# kept, the method after them (``:in `index'``) not.
_SOURCE_LINE = re.compile(r"([^\s:]++:[0-9]++)(?::in\s.*)?", re.DOTALL | re.ASCII)
_SOURCE_KEYS = frozenset({"line", "source_location"})
# Words, camelCase split too: ``apiKey`` is ``api`` and ``Key``.
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+", re.ASCII)
_ALNUM_RUN = re.compile(r"[A-Za-z0-9]++", re.ASCII)
_LONG_NUMBER = re.compile(r"[0-9]{6}", re.ASCII)
_UUID = re.compile(r"[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}", re.ASCII)
# Parts of a value that name a credential: a value that holds one is where an app that put a
# request's data in a tag would have put the password. Anywhere in the value:
CREDENTIAL_STEMS = (
    "passw",
    "secret",
    "token",
    "credential",
    "apikey",
    "bearer",
    "authent",
    "authoriz",
    "privatekey",
    "accesskey",
    "sessionid",
)
# As a whole word only (``authors``, ``monkey`` and ``passenger`` name code, not credentials):
CREDENTIAL_WORDS = frozenset(
    {"pass", "pw", "pwd", "key", "keys", "auth", "oauth", "authn", "authz", "otp", "totp", "jwt"}
    | {"sig", "signature", "cvv", "cvc"}
)
# A run of letters and digits this long, mixed the way a random token mixes them (digits in
# several places, or many), is a token, not a name of code (``S3UploadsController`` is one).
_RANDOM_RUN = 16
_RANDOM_SWITCHES = 3  # changes between letters and digits
_RANDOM_DIGITS = 5
_SWITCH = re.compile(r"[A-Za-z](?=[0-9])|[0-9](?=[A-Za-z])", re.ASCII)


def _looks_like_a_credential(value: str) -> bool:
    """Whether ``value`` names a credential or looks like one (a key, a token, a card number)."""
    lower = value.lower()
    if any(stem in lower for stem in CREDENTIAL_STEMS):
        return True
    if any(word.lower() in CREDENTIAL_WORDS for word in _WORD.findall(value)):
        return True
    if _LONG_NUMBER.search(value) or _UUID.search(value):
        return True
    return any(_random_looking(run) for run in _ALNUM_RUN.findall(value))


def _random_looking(run: str) -> bool:
    if len(run) < _RANDOM_RUN or run.isalpha() or run.isdigit():
        return False
    digits = sum(ch.isdigit() for ch in run)
    return digits >= _RANDOM_DIGITS or len(_SWITCH.findall(run)) >= _RANDOM_SWITCHES


def tag_value(key: str, value: str) -> str | None:
    """Return what is shown of tag ``key``'s (decoded) ``value``; None: nothing, withhold it.

    Kept only when it can name code and nothing else: a token (``_TOKEN``), or for ``route`` a
    path (``_PATH``) cut before its query string, fragment or path parameters, or for ``line``
    and ``source_location`` the file and line; at most ``TAG_VALUE_LIMIT`` characters, and nothing
    that names a credential or looks like one. Never cut to fit: a value too long is withheld,
    since the cut could fall inside a secret.

    Args:
        key: a key of ``TAG_KEYS`` (any other is never shown: None).
        value: the value as the app meant it (URL-decoded, unescaped).

    Returns:
        The value to show, or None.
    """
    if key not in TAG_KEYS:
        return None
    allowed = _TOKEN
    if key == "route":
        if (end := _PATH_END.search(value)) is not None:
            if value.startswith("(?", end.start() - 1):
                return None  # a regular expression's group (re_path's (?P<pk>...)), no query
            value = value[: end.start()]
        allowed = _PATH
    elif key in _SOURCE_KEYS:
        if (m := _SOURCE_LINE.fullmatch(value.strip())) is not None:
            value = m.group(1)
        allowed = _PATH
    value = value.strip()
    if not value or len(value) > TAG_VALUE_LIMIT or allowed.fullmatch(value) is None:
        return None
    return None if _looks_like_a_credential(value) else value


def safe_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """Return ``tags`` as they may be shown: the rules of ``tag_value`` applied to each.

    For tags read back from where anyone may have written them (a status). Idempotent: tags this
    module made come back unchanged.
    """
    shown: dict[str, str] = {}
    for key in TAG_KEYS:
        if key in tags:
            value = tags[key]
            kept = TAG_WITHHELD if value == TAG_WITHHELD else tag_value(key, value)
            shown[key] = TAG_WITHHELD if kept is None else kept
    return shown


def _sqlcommenter_decode(raw: str) -> str:
    # The spec escapes ' with a backslash; sqlcommenter-python doubles % for pyformat drivers,
    # and a driver that did not format the statement leaves the doubled % in it.
    unescaped = _BACKSLASH_ESCAPE.sub(r"\1", raw).replace("%%", "%")
    return urllib.parse.unquote(unescaped, errors="replace")


def _marginalia_pairs(body: str) -> list[tuple[str, str]] | None:
    """The pairs of a Marginalia comment body; None when the body is not one."""
    pairs: list[tuple[str, str]] = []
    pos = 0
    while True:
        if (key := _MARGINALIA_KEY.match(body, pos)) is None:
            return None
        pos = key.end()
        if (quoted := _MARGINALIA_QUOTED.match(body, pos)) is not None:
            value = _BACKSLASH_ESCAPE.sub(r"\1", quoted.group(1))
            pos = quoted.end()
        else:
            comma = body.find(",", pos)
            end = len(body) if comma < 0 else comma
            value = body[pos:end]
            pos = end
        pairs.append((key.group(1), value))
        if pos == len(body):
            return pairs
        pos += 1  # the comma: a value stops at one or at the end


def _comment_pairs(body: str) -> list[tuple[str, str]]:
    """The (key, value) pairs of one comment body in either format, decoded; [] for prose."""
    if _SQLCOMMENTER.fullmatch(body):
        return [
            (_sqlcommenter_decode(m.group(1)), _sqlcommenter_decode(m.group(2)))
            for m in _SQLCOMMENTER_PAIRS.finditer(body)
        ]
    return _marginalia_pairs(body) or []


def _tags_of(scan: _Scan) -> dict[str, str]:
    merged: dict[str, str] = {}
    for body in scan.comments:
        for key, value in _comment_pairs(body):
            # An unknown key is dropped without a word: traceparent and friends are on every
            # statement of a traced app, and a key can itself be the secret.
            if key not in TAG_KEYS or not value.strip():
                continue
            kept = tag_value(key, value)
            merged[key] = TAG_WITHHELD if kept is None else kept
    return {k: merged[k] for k in TAG_KEYS if k in merged}


def parse_tags(query: str) -> dict[str, str]:
    """Return the code location tags of ``query``'s comments (sqlcommenter or Marginalia).

    Only the keys of ``TAG_KEYS``, in that order: ``traceparent``, ``tracestate`` and the like
    change with every request and would split one place in the code into as many shapes as there
    were requests, and a key of the app's own may name anything. A value is URL-decoded
    (sqlcommenter) and kept only as ``tag_value`` allows; any other is ``TAG_WITHHELD``, never a
    part of it. Comments are found as PostgreSQL finds them: text inside a literal is no comment.

    Args:
        query: a statement as ``pg_stat_activity.query`` shows it.

    Returns:
        The kept tags; {} when no comment has any (or none is in a known format).
    """
    return _tags_of(_scan(query))


# --- statements ---------------------------------------------------------------------------------


def _fingerprint(base: str, tags: Mapping[str, str]) -> str:
    # Values are safe tokens (no newline), so the newline separates the parts unambiguously.
    parts = [base, *(f"{k}={tags[k]}" for k in TAG_KEYS if k in tags)]
    digest = hashlib.sha256("\n".join(parts).encode("utf-8", "surrogatepass")).hexdigest()
    return digest[:FINGERPRINT_HEX_CHARS]


def statement_of(query: str, query_id: int | None) -> Statement | None:
    """Return the shape of a backend's last statement, or None when there is none to show.

    The fingerprint is PostgreSQL's ``query_id`` when it computed one (it already ignores
    literals, and is what pg_stat_statements keys on), else the normalised text; with the tags
    either way, since ``query_id`` ignores comments and two routes running the same statement are
    two places in the code.

    Args:
        query: ``pg_stat_activity.query``.
        query_id: ``pg_stat_activity.query_id``; None or 0 when not computed.

    Returns:
        The statement's shape; None for an empty statement, a comment alone, or a statement the
        probe's role may not see (``HIDDEN``).
    """
    if query.strip() in _NOT_STATEMENTS:
        return None
    scan = _scan(query)
    text = _shape(scan, STATEMENT_LIMIT)
    if not text:
        return None
    tags = _tags_of(scan)
    base = f"q:{query_id}" if query_id else "t:" + _shape(scan, FINGERPRINT_TEXT_LIMIT)
    return Statement(fingerprint=_fingerprint(base, tags), text=text, tags=tags)


def rank_statements(
    statements: Iterable[Statement | None], *, top: int = TOP_STATEMENTS
) -> list[tuple[Statement, int]]:
    """Return the ``top`` most frequent shapes among ``statements`` with their counts.

    Most frequent first, then by text and fingerprint so equal counts always list in one order.
    None (a statement not seen) counts for nothing.

    Args:
        statements: the shapes of a group's backends, one per backend.
        top: how many shapes to return.

    Returns:
        ``(statement, count)`` pairs.
    """
    counts: dict[str, int] = {}
    first: dict[str, Statement] = {}
    for s in statements:
        if s is None:
            continue
        counts[s.fingerprint] = counts.get(s.fingerprint, 0) + 1
        first.setdefault(s.fingerprint, s)
    ranked = sorted(counts, key=lambda f: (-counts[f], first[f].text, f))
    return [(first[f], counts[f]) for f in ranked[:top]]
