"""Who may use the admin socket, and for what: roles from the caller's uid and groups.

The socket file (0660, in a 0750 directory) already keeps out everyone outside its
group; within it, the role is decided per request from the peer credentials the
kernel reports for the connection (SO_PEERCRED: pid, uid, gid at ``connect()``):

* uid 0 and the daemon's own uid are operators;
* a member of ``admin_operator_group`` is an operator, of ``admin_viewer_group`` a
  viewer: the group is the caller's primary group (from the passwd entry, or the gid
  it connected with) or one of its supplementary groups (``getgrouplist``, which asks
  NSS, i.e. /etc/group on a plain host);
* anyone else has no role and is refused even the read verbs.

Groups are resolved at each request, not cached: admin traffic is a few requests a
minute at most, and a membership just granted or withdrawn takes effect at once.
NSS may block (LDAP), so the server calls :meth:`Access.role_of` off the event loop.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct

import msgspec

from dbsync.admin.protocol import Role

__all__ = ["Access", "Peer", "peer_of"]

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Peer(msgspec.Struct, frozen=True):
    """The process at the other end of a Unix socket connection, as the kernel saw it."""

    pid: int
    uid: int
    gid: int


def peer_of(connection: socket.socket) -> Peer:
    raw = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return Peer(pid, uid, gid)


class Access(msgspec.Struct, frozen=True, kw_only=True):
    """The role policy of one configuration (``[daemon]``'s two groups)."""

    daemon_uid: int
    viewer_group: str | None = None
    operator_group: str | None = None

    def role_of(self, peer: Peer) -> Role:
        """Blocking (NSS lookups): call it in a thread."""
        if peer.uid in (0, self.daemon_uid):
            return Role.OPERATOR
        groups = _groups_of(peer)
        if _gid(self.operator_group) in groups:
            return Role.OPERATOR
        if _gid(self.viewer_group) in groups:
            return Role.VIEWER
        return Role.NONE


def _gid(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None  # removed since the configuration was checked: nobody is in it


def _groups_of(peer: Peer) -> set[int]:
    groups = {peer.gid}
    try:
        user = pwd.getpwuid(peer.uid)
    except KeyError:
        return groups  # a uid without a passwd entry has only the group it runs with
    groups.add(user.pw_gid)
    groups.update(os.getgrouplist(user.pw_name, user.pw_gid))
    return groups
