"""MCP tool modules. Each has `register(mcp, services)` (tools read services from the lifespan context, static resources from the argument); a later feature (dream loop, certificates) adds a
module here and one line in `amygdala.server.mcp_server.TOOL_MODULES`."""
