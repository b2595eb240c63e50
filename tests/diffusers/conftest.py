"""Fixtures shared by the diffusers tests."""

from tests.convert.helpers import single_thread  # noqa: F401  (module-scoped autouse fixture)
