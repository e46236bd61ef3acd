"""amygdala's MCP server: tools over stdio and streamable HTTP, plus the training HTTP API."""

__version__ = "0.1.0"
