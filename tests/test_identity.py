"""The daemon's default identity: stable across restarts, distinct between live daemons."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from replicator.daemon.identity import claim_identity, slot_lock_path
from replicator.journal import Journal
from replicator.journal.core import new_installation_id

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from replicator.daemon.identity import claim_identity
    print(claim_identity(Path(sys.argv[1]), sys.argv[2]).id, flush=True)
    time.sleep(600)
""")


def test_the_installation_id_is_made_once_and_kept_in_the_journal(tmp_path: Path):
    first = Journal(tmp_path / "j.db")
    made = first.installation_id
    first.close()
    again = Journal(tmp_path / "j.db")
    assert again.installation_id == made and made
    again.close()
    other = Journal(tmp_path / "other.db")
    assert other.installation_id != made
    other.close()


def test_an_installation_id_is_a_readable_client_id():
    made = new_installation_id("eu west_1.example.com")
    assert made.startswith("eu-west-1.example.com-") and len(made) <= 49
    assert new_installation_id("").startswith("replicator-")
    assert new_installation_id("x" * 200).count("x") == 40


def test_live_claims_are_distinct_and_a_released_slot_is_claimed_again(tmp_path: Path):
    journal = tmp_path / "j.db"
    one = claim_identity(journal, "inst")
    two = claim_identity(journal, "inst")
    assert (one.id, two.id) == ("inst-0", "inst-1")
    one.release()
    assert claim_identity(journal, "inst").id == "inst-0"
    assert slot_lock_path(journal, 1).exists()


def test_a_killed_holders_slot_is_free_at_once(tmp_path: Path):
    """SIGKILL leaves no chance to clean up: the kernel drops the flock with the process,
    so the restarted daemon is the same instance, with no stale lock file to remove."""
    journal = tmp_path / "j.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(journal), "inst"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "inst-0"
        assert claim_identity(journal, "inst").id == "inst-1"  # held: a second daemon
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert claim_identity(journal, "inst").id == "inst-0"


def test_daemons_reaching_one_journal_by_different_paths_get_distinct_slots(tmp_path: Path):
    """A journal named through a symbolic link (a linked directory, or a link to the
    file) is the same journal: two daemons on it must not share an identity, since each
    returns its identity's leases at start as its dead predecessor's."""
    real = tmp_path / "var" / "j.db"
    real.parent.mkdir()
    (tmp_path / "srv").symlink_to(real.parent)
    (tmp_path / "j-link.db").symlink_to(real)
    claims = [
        claim_identity(path, "inst")
        for path in (real, tmp_path / "srv" / "j.db", tmp_path / "j-link.db")
    ]
    try:
        assert [c.slot for c in claims] == [0, 1, 2]
    finally:
        for c in claims:
            c.release()


def test_a_slot_file_that_is_a_symbolic_link_is_refused_and_its_target_untouched(
    tmp_path: Path,
):
    import pytest

    from replicator.errors import ReplicatorError

    target = tmp_path / "precious"
    target.write_text("keep")
    slot_lock_path(tmp_path / "j.db", 0).symlink_to(target)
    with pytest.raises(ReplicatorError, match=r"slot-0\.lock"):
        claim_identity(tmp_path / "j.db", "inst")
    assert target.read_text() == "keep"
