"""Rules and helpers shared by the server, site, launcher and SDK (no I/O)."""
