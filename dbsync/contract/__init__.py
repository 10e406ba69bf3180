"""What dbsync assumes of Demandbase where its documents are silent, and how it checks.

``docs/demandbase-contract.md`` names the assumptions A1 to A5. This package owns the
two ways dbsync tests them against a real tenant:

- :mod:`dbsync.contract.watch`: the checks the daemon makes on every answer at run
  time (a job that reports another list, a state nobody knows), whatever a probe said;
- :mod:`dbsync.contract.probe`: ``dbsync probe``, a short scripted conversation with
  the tenant that announces its spend, then gives a verdict per assumption;
- :mod:`dbsync.contract.record`: the probe's result, kept per destination beside the
  daemon's state, which ``dbsync ctl status`` shows.
"""
