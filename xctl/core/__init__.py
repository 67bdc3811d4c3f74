"""The pure domain: events, causal graph, cluster view, `why`. No I/O lives here."""
