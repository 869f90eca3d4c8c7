"""The fast, in-process tests: fixtures come from harness.py (helpers are imported from there too)."""

from .harness import api, app, base_url, clock, fast_env, pass_time, service  # noqa: F401  (fixtures)


def pytest_configure(config):
    config.addinivalue_line("markers", "settings(**env): configuration of the in-process service (tests/fast)")
