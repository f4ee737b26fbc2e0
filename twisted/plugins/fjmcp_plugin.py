"""
The C{twistd fjmcp} plugin.

Only a name: the tap module is imported when the command is actually used, so
plugin discovery for every other twistd command stays cheap.
"""

from twisted.application.service import ServiceMaker

fjmcp = ServiceMaker(
    "fjmcp",
    "fjmcp.app.tap",
    "OAuth 2.1 authorization server and MCP session broker for forgejo-mcp.",
    "fjmcp",
)
