"""The compiler's download policy (UIW_HTTP_TIMEOUT, UIW_HTTP_RETRIES): a bad value is a user
error naming the variable, with a hint, not a traceback out of float()."""

from __future__ import annotations

from pathlib import Path

import pytest

from compiler.errors import UserError
from compiler.sources.download import Policy
from tests.conftest import run_compiler


def test_policy_from_the_environment():
    assert Policy.from_env({}) == Policy()
    assert Policy.from_env({"UIW_HTTP_TIMEOUT": " 2.5 ", "UIW_HTTP_RETRIES": "0"}) == Policy(timeout=2.5, retries=0)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("UIW_HTTP_TIMEOUT", "soon"),
        ("UIW_HTTP_TIMEOUT", "0"),
        ("UIW_HTTP_TIMEOUT", "-5"),
        ("UIW_HTTP_TIMEOUT", "nan"),
        ("UIW_HTTP_TIMEOUT", "inf"),
        ("UIW_HTTP_RETRIES", "3.5"),
        ("UIW_HTTP_RETRIES", "-1"),
        ("UIW_HTTP_RETRIES", "many"),
    ],
)
def test_a_bad_value_is_a_user_error_with_a_hint(name: str, value: str):
    with pytest.raises(UserError) as caught:
        Policy.from_env({name: value})
    (problem,) = caught.value.problems
    assert problem.where == f"environment: {name}"
    assert repr(value) in problem.what and problem.hint.startswith("unset it for ")


def test_the_compiler_exits_2_with_the_hint(tmp_path: Path):
    """Through the command: the user error's exit status and message, no traceback (it used to
    end as an internal error, exit status 1)."""
    proc = run_compiler("recipe=demo", home=tmp_path / "home", env={"UIW_HTTP_TIMEOUT": "soon"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert "environment: UIW_HTTP_TIMEOUT" in proc.stderr and "hint: unset it" in proc.stderr, proc.stderr[-2000:]
