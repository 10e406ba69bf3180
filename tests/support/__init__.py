"""What only the tests need: the OpenAPI oracle that the emulator and the client are held to.

The harness they share with the benchmarks and the demo is :mod:`dbsync.testing`.
"""
