"""dbsync: keeps Demandbase account lists equal to CDP account audiences, and proves it."""

__version__ = "0.1.0"
