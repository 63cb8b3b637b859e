"""One validator per field of a customer, its services and databases: the model fields carry them, so the admin's
forms and the CLI (customer_add → customers.services.customer_create → full_clean) refuse the same values with
the same message. Rules that need no Django (a TCP port) live in engines and are only wrapped here."""

from __future__ import annotations

import re

from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator

from engines import dburl

slug_validator = RegexValidator(r"^[a-z0-9][a-z0-9_-]{0,62}$", "Use lowercase letters, digits, - and _.")

MAX_ARGS, MAX_ARG_LEN = 200, 4096


def validate_tcp_port(value) -> None:
    """A database (or maintenance) server's port: 1-65535. The message is dburl's, as for a --database URL."""
    if value is None:
        return
    if problem := dburl.port_problem(value):
        raise ValidationError(problem, code="port")


def validate_argv(value) -> None:
    """A start/stop command: an argv list of strings (never a shell string). The program (first argument) holds
    no space unless it is an absolute path: "npm start" in one argument is a command line typed by mistake."""
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise ValidationError("must be a list of strings (argv), not a shell string", code="argv")
    if len(value) > MAX_ARGS:
        raise ValidationError(f"at most {MAX_ARGS} arguments", code="argv")
    for arg in value:
        if "\x00" in arg or "\n" in arg or "\r" in arg:
            raise ValidationError("an argument may not contain a NUL byte or a line break", code="argv")
        if len(arg) > MAX_ARG_LEN:
            raise ValidationError(f"an argument may be at most {MAX_ARG_LEN} characters long", code="argv")
    if value and not value[0].strip():
        raise ValidationError("the first argument (the program) is empty", code="argv")
    if value and any(c.isspace() for c in value[0]) and not value[0].startswith("/"):
        words = value[0].split()
        raise ValidationError(f"the program {value[0]!r} contains a space: put one argument per line "
                              f"({', then '.join(words[:4])})", code="argv")


def validate_versions(value) -> None:
    """The recorded versions: {component: version}, both non-empty words (what `--version COMPONENT=VERSION` and
    the releases name)."""
    if not isinstance(value, dict):
        raise ValidationError("must map each component to its version", code="versions")
    for component, version in value.items():
        if not isinstance(version, str) or not component or not version.strip():
            raise ValidationError(f"component {component!r}: a version is required", code="versions")
        if any(c.isspace() or c == "=" for c in component) or any(c.isspace() for c in version):
            raise ValidationError(f"{component}={version}: no spaces in a component or version", code="versions")


TAG = r"[a-z0-9][a-z0-9_.-]{0,39}"


def normalize_tags(value: str) -> str:
    """`Canary, eu-west  beta` → `beta,canary,eu-west`: lower case, sorted, no repeats (rollouts select by tag)."""
    parts = [t for t in re.split(r"[\s,]+", (value or "").strip().lower()) if t]
    return ",".join(sorted(dict.fromkeys(parts)))


def validate_tags(value: str) -> None:
    bad = [t for t in normalize_tags(value).split(",") if t and not re.fullmatch(TAG, t)]
    if bad:
        raise ValidationError(f"tags are words of letters, digits, '-', '_' or '.' (at most 40), separated by "
                              f"commas or spaces; not: {', '.join(bad[:5])}")
