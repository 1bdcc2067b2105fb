"""Where a site's data and secrets are found: its clinfed_site.json, or the simulator's data root."""

from __future__ import annotations

import json

import pytest

from clinfed.errors import ConfigError
from clinfed.site_config import DATA_ROOT_ENV, site_files


def test_site_config_file_paths_relative_to_local(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    local = tmp_path / "site-1" / "local"
    local.mkdir(parents=True)
    (local / "clinfed_site.json").write_text(json.dumps({"data_dir": "/data/site-1", "secret_file": "/s/key"}))
    files = site_files("site-1", local)
    assert str(files.data_dir) == "/data/site-1" and str(files.secret_file) == "/s/key"
    assert files.masking_key_file == local / "masking_key.pem"
    # Privacy state outlives jobs: next to the workspace's local/, never inside a run folder.
    assert files.privacy_dir.resolve() == (tmp_path / "site-1" / "clinfed_privacy").resolve()


def test_simulator_site_keeps_secrets_and_privacy_state_in_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "data"))
    files = site_files("site-2", tmp_path / "nowhere")
    assert files.data_dir == tmp_path / "data" / "site-2"
    assert files.masking_key_file.parent == files.data_dir == files.privacy_dir.parent


@pytest.mark.parametrize("content, message", [("{not json", "not valid JSON"),
                                              ('{"secret_file": "x"}', "'data_dir' is missing")])
def test_bad_site_config_names_the_file_and_the_problem(tmp_path, monkeypatch, content, message):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    (tmp_path / "clinfed_site.json").write_text(content)
    with pytest.raises(ConfigError, match=message) as err:
        site_files("site-1", tmp_path)
    assert "clinfed_site.json" in str(err.value)


def test_no_config_and_no_data_root_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    with pytest.raises(ConfigError, match=DATA_ROOT_ENV):
        site_files("site-3", tmp_path)


BAD_SITE_CONFIGS = [
    ('{"data_dir": "/data/a", "data_dir": "/data/b"}', "duplicate key 'data_dir'"),
    ('{"data_dir": "/data/a",\n "secret_file": }', "clinfed_site.json:2: not valid JSON"),
    ('["/data/a"]', "must hold a JSON object"),
    ('{"data_dir": "/data/a", "privacy_dir": NaN}', "NaN is not a JSON number"),
    ('{"data_dir": "/data/a", "data_dri": "/data/b"}', "field 'data_dri' is unknown"),
    ('{"data_dir": 7}', "field 'data_dir' must be a path string, got 7"),
    ('{"data_dir": "/data/a", "secret_file": ""}', "field 'secret_file' must be a path string"),
]


@pytest.mark.parametrize("content, message", BAD_SITE_CONFIGS, ids=[m for _, m in BAD_SITE_CONFIGS])
def test_site_config_is_read_with_the_safe_loader_and_its_fields_checked(tmp_path, monkeypatch, content, message):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    (tmp_path / "clinfed_site.json").write_text(content)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
        site_files("site-1", tmp_path)
    assert str(err.value).startswith(str(tmp_path / "clinfed_site.json"))


def test_oversized_site_config_is_refused_unread(tmp_path, monkeypatch):
    from clinfed.config_files import MAX_BYTES

    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    (tmp_path / "clinfed_site.json").write_text('{"data_dir": "/data/a", "ledger": {"x": "' + "y" * MAX_BYTES + '"}}')
    with pytest.raises(ConfigError, match=f"larger than {MAX_BYTES} bytes"):
        site_files("site-1", tmp_path)
