"""
The Forgejo side: its OAuth2 and API client, and each user's upstream credential.
"""
