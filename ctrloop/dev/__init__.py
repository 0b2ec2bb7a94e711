"""Development tools: local Kafka/Redis servers, the one-command stack, the demo.

Only the CLI, tests and benchmarks import this (tests/unit/test_packaging.py).
"""
