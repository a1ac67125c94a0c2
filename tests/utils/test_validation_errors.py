"""validation_problems: each pydantic error as ``where: what``, nested locations dotted, the root named."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError

from ccm_sdk.utils.validation_errors import validation_problems


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(ge=1)


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inner: Inner
    name: str


def _error(cls, value) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        cls.model_validate(value)
    return info.value


def test_each_problem_with_its_dotted_location():
    exc = _error(Outer, {"inner": {"steps": 0, "extra": 1}})
    message = validation_problems(exc)
    assert message.split("; ") == [
        "inner.steps: Input should be greater than or equal to 1",
        "inner.extra: Extra inputs are not permitted",
        "name: Field required",
    ]
    assert "inner.steps: Input should be greater than or equal to 1 (got 0)" in validation_problems(exc, with_input=True)


def test_an_error_on_the_whole_value_names_the_root():
    exc = _error(RootModel[int], "many")
    assert validation_problems(exc, root="body").startswith("body: Input should be a valid integer")
    assert validation_problems(exc).startswith("<root>: ")
