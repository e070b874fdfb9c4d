"""MCP (Model Context Protocol) for memento-edge: agents use memory as tools.

* :mod:`.protocol` - JSON-RPC dispatch for both protocol generations (2026-07-28 and 2025-xx), no transport.
* :mod:`.tools` - the seven ``memory_*`` tools: schemas, handlers, result capping.
* :mod:`memento_edge.web.mcp` - ``POST /mcp`` on the Flask app (auth, limits and governor as for REST).
* :mod:`.stdio` - ``memento-edge mcp``: a stdio server relaying to an appliance, or serving a local database.
"""
