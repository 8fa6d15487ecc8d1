"""Lets `pytest bench --benchmark-only` collect the bench_*.py scripts' pytest-benchmark tests."""
import pytest


def pytest_collect_file(parent, file_path):
    # A file named on the command line is collected by pytest itself: do not collect it twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
