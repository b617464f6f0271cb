"""
The tests of miniproxy.

Importing this package registers and loads the C{miniproxy} hypothesis
profile, so that every property test is deterministic (derandomized, no
deadline) wherever it runs.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "miniproxy",
    derandomize=True,
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("miniproxy")
