"""The pure domain: events, features, joining, delays, models, learning, scoring math.

Imports nothing of ctrloop outside ctrloop.core (tests/unit/test_packaging.py).
"""
