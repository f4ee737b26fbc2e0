"""
fjmcp's trial suite.  Hypothesis runs without deadlines: this machine is
shared and noisy, and a slow example is not a wrong one.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "fjmcp", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=100
)
settings.load_profile("fjmcp")
