"""Fixtures shared by the convert tests."""

from tests.convert.helpers import single_thread  # noqa: F401  (module-scoped autouse fixture)
