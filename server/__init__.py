"""The MCP server and HTTP daemon: tools over stdio and streamable HTTP, the training API, the composition root."""
