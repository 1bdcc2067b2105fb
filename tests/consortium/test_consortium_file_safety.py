"""The consortium file is read safely (clinfed.config_files): a duplicate key, an alias bomb, a
huge or binary file are refused through ``clinfed consortium provision`` naming the file and line,
with exit 2 and nothing written; anchors used for what they are for still work."""

from __future__ import annotations

import resource
import time
import tracemalloc

import pytest
from consortium_helpers import CONSORTIUM_YML

from clinfed.cli import main
from clinfed.config_files import MAX_BYTES, load_yaml
from clinfed.consortium import load_consortium
from clinfed.errors import ConfigFileError

COMMITTED = CONSORTIUM_YML.read_text()


def _line_of(text: str, fragment: str, occurrence: int = 1) -> int:
    lines = [i + 1 for i, line in enumerate(text.splitlines()) if fragment in line]
    return lines[occurrence - 1]


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The committed consortium with a billion-laughs bomb in an org's description: ``width**levels``
    strings once expanded (9**9 = 387M), in a file of about 1 KB."""
    anchors = "lol0: &a0 [" + ", ".join(["lol"] * width) + "]\n"
    anchors += "".join(f"lol{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]\n" for i in range(1, levels + 1))
    return anchors + COMMITTED.replace("  - name: hospital_1\n", f"  - name: hospital_1\n    description: *a{levels}\n", 1)


def _provision_refused(tmp_path, capsys, text: str | bytes) -> str:
    path = tmp_path / "consortium.yml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "out"
    assert main(["consortium", "provision", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"clinfed: error: {path}") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists(), "a refused definition must write nothing"
    return err


def test_duplicated_study_key_is_refused_naming_the_key_and_both_lines(tmp_path, capsys):
    text = COMMITTED.replace("study: clinfed-tumour-seg\n", "study: clinfed-tumour-seg\nstudy: another-study\n")
    first, second = _line_of(text, "study:"), _line_of(text, "study:", 2)
    err = _provision_refused(tmp_path, capsys, text)
    assert f"consortium.yml:{second}: duplicate key 'study' (first given at line {first})" in err


def test_duplicate_key_deep_inside_a_site_is_refused_with_its_line(tmp_path, capsys):
    text = COMMITTED.replace("      default_scope: public\n", "      default_scope: public\n      default_scope: strict  # again\n", 1)
    err = _provision_refused(tmp_path, capsys, text)
    line = _line_of(text, "# again")
    assert f":{line}: duplicate key 'default_scope' (first given at line {line - 1})" in err


def test_alias_bomb_is_refused_within_a_second_and_100_mb(tmp_path, capsys):
    bomb = tmp_path / "bomb.yml"
    bomb.write_text(alias_bomb())
    assert bomb.stat().st_size < 5000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ConfigFileError) as info:
            load_consortium(bomb)
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    with capsys.disabled():
        print(f"\nalias bomb refused in {seconds * 1000:.1f} ms, Python allocations peak {peak / 1e6:.2f} MB, "
              f"peak RSS growth {rss_growth_mb:.1f} MB")
    assert seconds < 1.0 and peak < 100e6 and rss_growth_mb < 100
    assert "alias bomb" in str(info.value) and str(info.value).startswith(f"{bomb}:")
    # And through the CLI: exit 2, one line, nothing written.
    assert "anchors and aliases expand the document past" in _provision_refused(tmp_path, capsys, alias_bomb())


def test_the_bound_is_on_expansion_not_on_the_use_of_anchors(tmp_path):
    """Anchors for a repeated privacy block: accepted. The opponent's bomb above is refused by the
    expansion bound, not by a ban on aliases."""
    block = "    privacy:\n      scopes: [public, strict]\n      default_scope: public\n"
    assert COMMITTED.count(block) == 3
    text = COMMITTED.replace(block, "    privacy: &open\n      scopes: [public, strict]\n      default_scope: public\n", 1)
    text = text.replace(block, "    privacy: *open\n")
    assert text.count("*open") == 2
    path = tmp_path / "anchors.yml"
    path.write_text(text)
    consortium = load_consortium(path)
    assert consortium.site("site-4").privacy == consortium.site("site-2").privacy
    # A merge key overriding one field of an anchored block.
    (tmp_path / "merge.yml").write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\n")
    assert load_yaml(tmp_path / "merge.yml")["other"] == {"x": 1, "y": 3}


FILE_LEVEL_REFUSALS = [
    ("recursive alias", COMMITTED.replace("  - name: hospital_1\n", "  - &loop [name, *loop]\n  - name: hospital_1\n", 1),
     "a recursive alias"),
    ("YAML syntax error", COMMITTED.replace("scopes: [strict]", "scopes: [strict"), "not valid YAML"),
    ("two documents", COMMITTED + "---\nname: second\n", "expected a single document"),
    ("python object tag", COMMITTED.replace("name: clinfed-trial", "name: !!python/object/apply:os.system [id]"),
     "could not determine a constructor"),
    ("not UTF-8", COMMITTED.encode() + b"\n# \xff\xfe\n", "not UTF-8 text"),
    ("larger than the limit", COMMITTED + "#" * (MAX_BYTES + 1) + "\n", f"larger than {MAX_BYTES} bytes"),
    ("nested too deeply", COMMITTED.replace("ledger:\n  backend: local", "ledger:\n  backend: local\n  x: "
                                            + "[" * 3000 + "]" * 3000), "nested too deeply"),
    ("empty file", "", "field '<top>': the file must hold a mapping"),
    ("a list, not a mapping", "- name: a\n", "field '<top>': the file must hold a mapping"),
    ("description not a string", COMMITTED.replace("  - name: hospital_2\n", "  - name: hospital_2\n    description: "
                                                                             "[a, [b, c]]\n"),
     "field 'orgs[2].description': must be a string"),
]


@pytest.mark.parametrize("case,text,problem", FILE_LEVEL_REFUSALS, ids=[c[0] for c in FILE_LEVEL_REFUSALS])
def test_unsafe_consortium_file_is_refused_naming_it(tmp_path, capsys, case, text, problem):
    assert problem in _provision_refused(tmp_path, capsys, text)


def test_missing_or_folder_consortium_file_is_one_line(tmp_path, capsys):
    assert main(["consortium", "provision", str(tmp_path / "nope.yml"), "--out", str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'nope.yml'}: cannot read it (No such file or directory)" in capsys.readouterr().err
    assert main(["consortium", "provision", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "cannot read it (Is a directory)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
