"""Helpers shared by tests: the OpenAPI oracle and a running emulator with an HTTP caller."""
