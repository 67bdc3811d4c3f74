"""LLM diagnosis over the query API: rules first, then a model with read-only tools."""
