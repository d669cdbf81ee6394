from bench_common import pytest_terminal_summary  # noqa: F401  (the summary table after a run)
