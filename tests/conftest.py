"""Shared fixtures: real servers and clusters, started by the tests themselves."""

pytest_plugins = [
    "tests.helpers.moto_server",
    "tests.helpers.pg",
    "tests.helpers.gcs_emulator",
]
