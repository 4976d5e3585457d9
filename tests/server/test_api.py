"""Nothing to test here: tests/server/test_policies_online.py still imports `scrape` from
this module. It lives in tests/server/helpers.py; delete this file once that import does."""

from tests.server.helpers import scrape

__all__ = ["scrape"]
