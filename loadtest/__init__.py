"""Load tests and benchmarks: BOSH subscribers driven by Locust, scenario runner, reports."""
