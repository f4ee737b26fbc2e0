"""
Encryption at rest, token hashing and the key file.
"""
