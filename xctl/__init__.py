"""xctl: why is this GPU process stuck, slow or dead — and what to do about it."""

__version__ = "0.1.0"
