"""Prompt engineering: templates, an OpenAI-compatible client, scorers, self-consistency, ReAct and tools."""
