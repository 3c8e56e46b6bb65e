"""--require-license: which licence ids it takes, and what it allows."""

from __future__ import annotations

import pytest

from seglabel.core.config import JobConfig
from seglabel.core.errors import ConfigError
from seglabel.core.license import UNKNOWN, License, check_allowed


@pytest.mark.parametrize(
    ("given", "allowed"),
    [
        ("mit", ("mit",)),
        ("MIT, Apache-2.0,mit", ("mit", "apache-2.0")),
        (["BSD-3-Clause"], ("bsd-3-clause",)),
    ],
)
def test_require_license_values(given, allowed):
    assert JobConfig(output="/o", input="/i", require_license=given).require_license == allowed


@pytest.mark.parametrize("given", ["", " , ", 5, [1], {"mit": True}])
def test_require_license_refuses_what_is_not_a_list_of_ids(given):
    with pytest.raises(ConfigError, match="require_license"):
        JobConfig(output="/o", input="/i", require_license=given)


def test_check_allowed():
    check_allowed(License("mit", "card"), ("mit",), "m")
    check_allowed(License("cc-by-nc-4.0", "card"), None, "m")  # no rule: anything runs
    for refused in (License("cc-by-nc-4.0", "card"), License(UNKNOWN, "no card")):
        with pytest.raises(ConfigError, match="--require-license allows only mit"):
            check_allowed(refused, ("mit",), "m")
    with pytest.raises(ConfigError):  # "unknown" cannot be allowed by naming it
        check_allowed(License(UNKNOWN, "no card"), ("unknown",), "m")
