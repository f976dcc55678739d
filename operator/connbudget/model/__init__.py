"""The typed vocabulary shared by every layer: pure data, no I/O, no clock."""
