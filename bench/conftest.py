"""Lets `pytest bench --benchmark-only` collect the bench_*.py scripts' pytest-benchmark tests."""
import pytest


def pytest_collect_file(parent, file_path):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
