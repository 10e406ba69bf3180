"""Demandbase: the client that speaks its documented APIs, and the emulator that serves them."""
