"""Who gets which role on the admin socket, from a caller's uid and groups.

Uses the host's real passwd and group databases: ``nobody`` (65534) whose primary
group is ``nogroup`` (65534), as on Debian.
"""

from __future__ import annotations

import grp
import os
import pwd

import pytest

from dbsync.admin.access import Access, Peer
from dbsync.admin.protocol import Role

NOBODY = Peer(pid=1234, uid=65534, gid=65534)


def _has_nobody() -> bool:
    try:
        return pwd.getpwuid(65534).pw_gid == grp.getgrnam("nogroup").gr_gid
    except KeyError:
        return False


needs_nobody = pytest.mark.skipif(not _has_nobody(), reason="needs nobody:nogroup (65534)")


def test_root_and_the_daemons_own_user_are_operators() -> None:
    access = Access(daemon_uid=4242)
    assert access.role_of(Peer(pid=1, uid=0, gid=0)) is Role.OPERATOR
    assert access.role_of(Peer(pid=1, uid=4242, gid=4242)) is Role.OPERATOR


@needs_nobody
def test_anyone_else_needs_a_group() -> None:
    """No group configured: nobody has no role; a group nobody is not in changes
    nothing."""
    assert Access(daemon_uid=os.geteuid()).role_of(NOBODY) is Role.NONE
    assert Access(daemon_uid=0, viewer_group="root").role_of(NOBODY) is Role.NONE


@needs_nobody
def test_the_primary_group_makes_a_viewer_or_an_operator() -> None:
    assert Access(daemon_uid=0, viewer_group="nogroup").role_of(NOBODY) is Role.VIEWER
    assert Access(daemon_uid=0, operator_group="nogroup").role_of(NOBODY) is Role.OPERATOR
    both = Access(daemon_uid=0, viewer_group="nogroup", operator_group="nogroup")
    assert both.role_of(NOBODY) is Role.OPERATOR


@needs_nobody
def test_a_uid_without_passwd_entry_has_the_group_it_connected_with() -> None:
    stranger = Peer(pid=1, uid=54321, gid=65534)
    assert all(p.pw_uid != 54321 for p in pwd.getpwall())
    assert Access(daemon_uid=0, viewer_group="nogroup").role_of(stranger) is Role.VIEWER
    assert Access(daemon_uid=0, viewer_group="root").role_of(stranger) is Role.NONE


def test_a_group_removed_since_the_config_was_read_admits_nobody() -> None:
    access = Access(daemon_uid=0, operator_group="no-such-group-anywhere")
    assert access.role_of(Peer(pid=1, uid=54321, gid=54321)) is Role.NONE
