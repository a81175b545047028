"""Helpers of benchmarks/device_check.py: GPU probes, the step runner, the report, the offline prep."""
