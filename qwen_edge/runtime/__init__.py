"""The runtime: the one decode loop (generate), sampling, constraints, tool calls and ChatSession."""
