"""Built-in probes. Each is a pure parser plus a thin reader rooted at a path argument."""
