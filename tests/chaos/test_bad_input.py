"""Each bad input from the field, written into a running server's mesh file."""

from __future__ import annotations

import pytest

from tests.chaos.bad_inputs import BAD_INPUTS, SEQUENCES, bad_input
from tests.chaos.harness import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.mark.parametrize("case", [*BAD_INPUTS, *SEQUENCES])
def test_bad_input_leaves_the_last_good_config_served(stack: Stack, case: str) -> None:
    figures = bad_input(stack, case)
    print(figures)
    assert figures["traffic"]["failed"] == 0
