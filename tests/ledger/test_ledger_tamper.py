"""The local ledger is tamper-evident: an edited row, a deleted block, random bytes, a truncated
file or a rewritten chain is found on open, with the block named, and ``audit verify`` never
reports VERIFIED after any of them."""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
from pathlib import Path

import pytest

from clinfed.cli import main
from clinfed.ledger import Absence, Contribution, GlobalModel, LedgerError, LedgerTampered, LocalLedger
from ledger_helpers import COORDINATOR, SITES, digest, new_local_ledger

JOB = "job-tamper"
ROUNDS = 3


@pytest.fixture
def recorded(tmp_path) -> Path:
    """A ledger with a complete 3-round job, closed (WAL checkpointed into the file), and each
    participant's last-seen head recorded beside its identity."""
    path = new_local_ledger(tmp_path / "ledger.sqlite")
    for round_ in range(ROUNDS):
        for site in ("site-1", "site-2"):
            with LocalLedger(path, SITES[site]) as ledger:
                ledger.record_contribution(Contribution(JOB, round_, site, digest(f"{round_}/{site}"), 10))
        with LocalLedger(path, COORDINATOR) as ledger:
            ledger.record_global_model(GlobalModel(JOB, round_, digest(f"model/{round_}"), ["site-1", "site-2"],
                                                   "fedavg", expected_sites=list(SITES)))
            ledger.record_absence(Absence(JOB, round_, "site-3", "no consented patients"))
    for msp in (COORDINATOR, *SITES.values()):
        LocalLedger(path, msp).verify()  # every participant has seen the head
    return path


def _verify_cli(path: Path, capsys) -> tuple[int, str]:
    code = main(["audit", "verify", "--ledger", str(path), "--job", JOB])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _block_rows(path: Path) -> list:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT number, header FROM blocks ORDER BY number").fetchall()


def _model_block(path: Path, round_: int) -> int:
    ledger = LocalLedger(path, COORDINATOR)
    [model] = [m for m in ledger.global_models(JOB) if m.round == round_]
    return ledger.block_of(model.tx_id)["block"]


def test_untouched_ledger_verifies(recorded, capsys):
    code, out = _verify_cli(recorded, capsys)
    assert code == 0 and f"job {JOB}: VERIFIED" in out


def test_an_edited_record_hash_is_found_and_named(recorded, capsys):
    block = _model_block(recorded, 1)
    with sqlite3.connect(recorded) as conn:
        (proposal,) = conn.execute("SELECT proposal FROM blocks WHERE number = ?", (block,)).fetchone()
        forged = proposal.replace(digest("model/1").encode(), digest("a text file").encode())
        assert forged != proposal
        conn.execute("UPDATE blocks SET proposal = ? WHERE number = ?", (forged, block))
    with pytest.raises(LedgerTampered, match=f"block {block} fails verification: its transaction does not match "
                                             f"the hash in its header") as err:
        LocalLedger(recorded, COORDINATOR).verify()
    assert err.value.block == block
    code, out = _verify_cli(recorded, capsys)
    assert code != 0 and "VERIFIED" not in out.replace("NOT VERIFIED", "") and f"block {block}" in out


def test_an_edited_record_with_its_hashes_recomputed_still_fails_on_the_signature(recorded):
    """The forger also fixes the block's hashes and the chain after it: the writer's signature over
    the block, and the next writer's over its link, give it away."""
    import base64
    import hashlib

    block = _model_block(recorded, 1)
    with sqlite3.connect(recorded) as conn:
        header, proposal = conn.execute("SELECT header, proposal FROM blocks WHERE number = ?", (block,)).fetchone()
        forged = proposal.replace(digest("model/1").encode(), digest("a text file").encode())
        fields = json.loads(header)
        fields["proposal_sha256"] = hashlib.sha256(forged).hexdigest()
        new_header = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
        conn.execute("UPDATE blocks SET proposal = ?, header = ? WHERE number = ?", (forged, new_header, block))
    with pytest.raises(LedgerTampered, match=f"block {block} fails verification") as err:
        LocalLedger(recorded, COORDINATOR).verify()
    assert "signature" in str(err.value)
    assert base64  # noqa: used for clarity of the forger's toolbox


def test_a_deleted_block_is_found_and_named(recorded, capsys):
    block = _model_block(recorded, 0)
    with sqlite3.connect(recorded) as conn:
        conn.execute("DELETE FROM blocks WHERE number = ?", (block,))
    with pytest.raises(LedgerTampered, match=f"block {block} fails verification: it is missing"):
        LocalLedger(recorded, "Site2MSP").verify()
    code, out = _verify_cli(recorded, capsys)
    assert code != 0 and f"block {block}" in out and "nothing from block" in out


def test_deleting_the_last_blocks_is_found_by_the_head_each_participant_kept(recorded, capsys):
    last = _block_rows(recorded)[-1][0]
    with sqlite3.connect(recorded) as conn:
        conn.execute("DELETE FROM blocks WHERE number >= ?", (last - 2,))
    with pytest.raises(LedgerTampered, match=f"block {last - 2} fails verification: it is missing: the ledger ends "
                                             f"at block {last - 3}, but this participant saw block {last}"):
        LocalLedger(recorded, "Site1MSP").verify()
    code, out = _verify_cli(recorded, capsys)
    assert code != 0 and "VERIFIED" not in out.replace("NOT VERIFIED", "")


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes_in_the_file_are_found_with_the_block_named(recorded, tmp_path, capsys, seed):
    """Flip random bytes inside the stored blocks (the pages that hold the records)."""
    raw = bytearray(recorded.read_bytes())
    rows = _block_rows(recorded)
    rng = random.Random(seed)
    number, header = rows[rng.randrange(1, len(rows))]
    at = raw.find(header[:40])
    assert at > 0, "the block's header is stored contiguously in its page"
    for _ in range(3):
        position = at + rng.randrange(len(header))
        raw[position] ^= 1 << rng.randrange(8)
    copy = tmp_path / "flipped.sqlite"
    shutil.copy(recorded, copy)
    shutil.copytree(recorded.with_name(recorded.name + ".identities"), copy.with_name(copy.name + ".identities"))
    copy.write_bytes(bytes(raw))
    with pytest.raises(LedgerError, match=r"block \d+ fails verification") as err:
        LocalLedger(copy, COORDINATOR).verify()
    assert isinstance(err.value, LedgerTampered) and err.value.block <= number
    code, out = _verify_cli(copy, capsys)
    assert code != 0 and "VERIFIED" not in out.replace("NOT VERIFIED", "")


def test_a_truncated_file_is_refused_with_the_block_named(recorded, tmp_path, capsys):
    raw = recorded.read_bytes()
    recorded.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(LedgerError, match=r"(block \d+ fails verification|damaged)") as err:
        LocalLedger(recorded, COORDINATOR).verify()
    assert isinstance(err.value, LedgerTampered), err.value
    code, out = _verify_cli(recorded, capsys)
    assert code != 0 and "VERIFIED" not in out.replace("NOT VERIFIED", "")


def test_a_ledger_rebuilt_from_scratch_is_refused_by_the_participants_heads(recorded, tmp_path):
    """Someone with every simulator key rebuilds a clean-looking ledger from the genesis block on:
    the head each participant kept no longer matches."""
    copy_dir = tmp_path / "rebuilt"
    copy_dir.mkdir()
    rebuilt = copy_dir / "ledger.sqlite"
    shutil.copytree(recorded.with_name(recorded.name + ".identities"), rebuilt.with_name(rebuilt.name + ".identities"))
    heads = {p.parent.name: p.read_text() for p in rebuilt.with_name(rebuilt.name + ".identities").glob("*/ledger_head.json")}
    for head in rebuilt.with_name(rebuilt.name + ".identities").glob("*/ledger_head.json"):
        head.unlink()
    from clinfed.ledger.pki import simulation_identity_files, simulation_membership

    files = simulation_identity_files(rebuilt, "coordinator")
    LocalLedger.create(rebuilt, files.load(COORDINATOR), simulation_membership(rebuilt)).close()
    for name, text in heads.items():
        (rebuilt.with_name(rebuilt.name + ".identities") / name / "ledger_head.json").write_text(text)
    with pytest.raises(LedgerTampered, match="block 0 fails verification: it is not the genesis block this "
                                             "participant saw"):
        LocalLedger(rebuilt, "Site1MSP").verify()


def test_a_sqlite_row_edited_to_text_is_refused(recorded):
    with sqlite3.connect(recorded) as conn:
        conn.execute("UPDATE blocks SET header = CAST(header AS TEXT) WHERE number = 3")
    with pytest.raises(LedgerTampered, match="block 3 fails verification: a column holds something other than bytes"):
        LocalLedger(recorded, COORDINATOR).verify()
