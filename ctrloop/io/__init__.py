"""Adapters to the outside: Kafka, the model registry, connection settings.

Imports only ctrloop.core (tests/unit/test_packaging.py).
"""
