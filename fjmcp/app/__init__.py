"""
Service wiring: the composition root (tap), listeners.
"""
