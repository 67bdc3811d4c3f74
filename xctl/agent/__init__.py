"""The node agent: probe supervisor, local graph, publisher, actuator."""
