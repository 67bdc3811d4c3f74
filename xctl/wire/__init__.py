"""Wire protocol (DESIGN §6): msgpack codec with limits, message schemas, framing,
the ZeroMQ socket factory and the CLI's query client."""
