"""The admin socket: ``dbsync ctl`` talking to a running daemon over a Unix socket.

One exchange per connection: the client sends one request, a JSON document on one
line, and reads one reply line; then the connection closes. Requests and replies are
frozen msgspec Structs, tagged by verb (:mod:`dbsync.admin.protocol`); a refusal is a
:class:`~dbsync.admin.protocol.Fault` with a stable code that the client turns into a
fixed exit code (INTERFACES.md).

Modules, from the bottom up:

``protocol``  the requests, the replies, the fault codes and their exit codes; the
              one module both sides import (msgspec and the standard library only)
``client``    a blocking client (no event loop), so that ``dbsync ctl`` starts fast
``ctl``       the ``dbsync ctl`` front end on that client: arguments, tables, exit codes
``access``    who may do what: the caller's uid and groups (SO_PEERCRED) against the
              viewer and operator groups of ``[daemon]``
``verbs``     what each verb does to the running daemon
``server``    the socket itself: created 0660 in a 0750 directory, stale files
              removed, one task per exchange, closed on shutdown

This package imports nothing on its own: the client must not pull in the server.
"""
