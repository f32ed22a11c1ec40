"""The journal's directory must be ours alone (`replicator.daemon.identity`): another local
user who may write there could replace the journal or create every slot lock first."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from replicator.daemon.identity import (
    check_journal_directory,
    claim_identity,
    directory_problem,
    slot_lock_path,
)
from replicator.errors import ReplicatorError
from tests.harness.daemon import DaemonProcess
from tests.harness.util import wait_until

ME, OTHER = 1000, 1001
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="makes files another user owns")
DIR = stat.S_IFDIR


@pytest.mark.parametrize(
    ("mode", "owner", "problem"),
    [
        (0o750, ME, None),  # systemd's StateDirectoryMode=0750
        (0o700, ME, None),
        (0o755, 0, None),  # root's, not writable by others
        (0o1777, 0, None),  # sticky: others add names but cannot replace ours
        (0o757, ME, "writable by others (mode 0757)"),
        (0o770, ME, "writable by group (mode 0770)"),
        (0o777, 0, "writable by group and others (mode 0777)"),
        (0o755, OTHER, "owned by uid 1001"),
    ],
)
def test_which_directories_are_safe(mode, owner, problem):
    found = directory_problem(DIR | mode, owner, ME)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_the_daemon_refuses_a_world_writable_journal_directory_naming_the_fix(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o757)
    daemon = DaemonProcess(
        tmp_path,
        {
            "journal": str(state / "journal.db"),
            "sites": {"a": {"url": "http://127.0.0.1:1", "insecure": True}},
        },
    )
    daemon.start(wait=False)
    assert daemon.proc is not None
    code = wait_until(lambda: daemon.proc.poll(), timeout=30, what="the daemon to refuse")
    assert code != 0
    log = daemon.log()
    assert f"refusing the journal directory {state}: it is writable by others" in log
    assert f"chmod o-w {state}" in log
    assert not any(p.name.endswith(".lock") for p in state.iterdir())  # no slot taken

    state.chmod(0o750)  # what systemd's StateDirectoryMode=0750 makes: accepted
    daemon.start()
    assert daemon.instance_id
    assert daemon.stop() == 0


@as_root
def test_a_lock_or_journal_another_user_made_in_a_sticky_directory_is_refused(tmp_path: Path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    journal = shared / "j.db"
    check_journal_directory(journal)  # a sticky directory as such is accepted
    claim_identity(journal, "inst").release()

    planted = slot_lock_path(journal, 0)
    os.chown(planted, 65534, 65534)  # as if `nobody` had made it before our first start
    with pytest.raises(ReplicatorError, match=r"refusing .*slot-0\.lock: it is owned by .*65534"):
        claim_identity(journal, "inst")

    planted.unlink()
    journal.write_bytes(b"")
    os.chown(journal, 65534, 65534)
    with pytest.raises(ReplicatorError, match=r"refusing .*j\.db: it is owned by .*65534"):
        check_journal_directory(journal)


@as_root
def test_a_directory_another_user_owns_is_refused(tmp_path: Path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    with pytest.raises(ReplicatorError, match=r"owned by .*65534.*chown"):
        check_journal_directory(theirs / "j.db")


def test_a_writable_directory_above_the_journal_s_is_refused_too(tmp_path: Path):
    """Whoever may write the parent can rename the journal's directory away."""
    parent = tmp_path / "shared"
    (parent / "state").mkdir(parents=True)
    parent.chmod(0o777)
    with pytest.raises(
        ReplicatorError,
        match=rf"refusing the journal directory {parent}, above the journal directory "
        rf"{parent / 'state'}: it is writable by group and others .*chmod go-w {parent}",
    ):
        check_journal_directory(parent / "state" / "j.db")
    parent.chmod(0o1777)  # sticky, as /tmp: others cannot rename what is ours
    check_journal_directory(parent / "state" / "j.db")
