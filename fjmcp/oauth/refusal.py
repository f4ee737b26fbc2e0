"""
A refusal to tell a person: the request they made in a browser cannot go on
and nothing can be sent back to the application that sent them (an unknown
client, an unregistered redirect URI, an expired or foreign form or
sign-in).  The domain says what happened and the status it deserves; the
browser routes (L{fjmcp.http.browser}) show it as a page.
"""

from __future__ import annotations


class RefusalError(Exception):
    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message
