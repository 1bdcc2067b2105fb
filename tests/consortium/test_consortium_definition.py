"""The consortium definition: bad files are refused naming the field; project.yml and local files."""

from __future__ import annotations

import copy

import pytest
from consortium_helpers import CONSORTIUM_YML, consortium_dict, write_consortium

from clinfed.cli import main
from clinfed.consortium import ConsortiumError, load_consortium, parse_consortium
from clinfed.consortium import local_files
from clinfed.consortium.provision import project_yml
from clinfed.errors import ConfigError


def test_committed_consortium_file_is_valid():
    c = load_consortium(CONSORTIUM_YML)
    assert c.site_names == ["site-1", "site-2", "site-3", "site-4"]
    assert c.study == "clinfed-tumour-seg"
    assert c.site("site-1").privacy.scopes == ("strict",) and c.site("site-1").privacy.default_scope == "strict"
    assert {a.role for a in c.admins} == {"lead", "member"}
    assert [s.msp_id for s in c.sites] == ["Site1MSP", "Site2MSP", "Site3MSP", "Site4MSP"]
    assert c.site("site-1").privacy.update_dp.noise_multiplier == 1.0 and c.site("site-2").privacy.update_dp is None
    assert c.site("site-2").privacy.min_participants == 3


def _mutated(change) -> dict:
    raw = copy.deepcopy(consortium_dict())
    change(raw)
    return raw


BAD_DEFINITIONS = [
    ("duplicate site", lambda r: r["sites"].append(copy.deepcopy(r["sites"][0])), "sites[4].name", "duplicate site"),
    ("unknown role", lambda r: r["admins"][1].update(role="superuser"), "admins[1].role", "unknown role"),
    ("missing site org", lambda r: r["sites"][1].pop("org"), "sites[1].org", "missing"),
    ("undeclared site org", lambda r: r["sites"][2].update(org="hospital_9"), "sites[2].org", "not declared"),
    ("missing admin org", lambda r: r["admins"][0].pop("org"), "admins[0].org", "missing"),
    ("missing coordinator org", lambda r: r["coordinator"].pop("org"), "coordinator.org", "missing"),
    ("zero update-DP budget", lambda r: r["sites"][0]["privacy"]["update_dp"].update(epsilon=0),
     "sites[0].privacy.update_dp.epsilon", "> 0"),
    ("negative noise", lambda r: r["sites"][0]["privacy"]["update_dp"].update(noise_multiplier=-1.0),
     "sites[0].privacy.update_dp.noise_multiplier", "> 0"),
    ("missing clip", lambda r: r["sites"][0]["privacy"]["update_dp"].pop("clip_norm"),
     "sites[0].privacy.update_dp.clip_norm", "must be a number"),
    ("delta >= 1", lambda r: r["sites"][0]["privacy"]["update_dp"].update(delta=1.0),
     "sites[0].privacy.update_dp.delta", "(0, 1)"),
    ("unknown noise mode", lambda r: r["sites"][0]["privacy"]["update_dp"].update(noise="central"),
     "sites[0].privacy.update_dp.noise", "'distributed' or 'local'"),
    ("minimum of one site", lambda r: r["sites"][1]["privacy"].update(secure_aggregation={"min_participants": 1}),
     "sites[1].privacy.secure_aggregation.min_participants", ">= 2"),
    ("threshold of half", lambda r: r["sites"][1]["privacy"].update(
        secure_aggregation={"min_threshold_fraction": 0.4}),
     "sites[1].privacy.secure_aggregation.min_threshold_fraction", "[0.5, 1)"),
    ("unknown scope", lambda r: r["sites"][0]["privacy"].update(scopes=["strict", "lenient"]),
     "sites[0].privacy.scopes[1]", "unknown scope"),
    ("default scope not defined", lambda r: r["sites"][1]["privacy"].update(default_scope="none"),
     "sites[1].privacy.default_scope", "not one of"),
    ("no lead", lambda r: r["admins"][0].update(role="member"), "admins", "lead"),
    ("duplicate org", lambda r: r["orgs"].append({"name": "hospital_1"}), "orgs[5].name", "duplicate org"),
    ("bad org name for FLARE", lambda r: r["orgs"][1].update(name="hospital-1"), "orgs[1].name", "not a valid"),
    ("bad admin name", lambda r: r["admins"][0].update(name="lead"), "admins[0].name", "not a valid"),
    ("site named like coordinator", lambda r: r["sites"][0].update(name="server"), "sites[0].name", "coordinator"),
    ("port out of range", lambda r: r["coordinator"].update(fed_learn_port=70000), "coordinator.fed_learn_port",
     "TCP port"),
    ("unknown field", lambda r: r["sites"][0].update(colour="red"), "sites[0].colour", "unknown field"),
    ("no sites", lambda r: r.update(sites=[]), "sites", "non-empty"),
    ("missing study", lambda r: r.pop("study"), "study", "missing"),
    ("two sites, one MSP", lambda r: r["sites"][2].update(name="site_1"), "sites[2].name", "Site1MSP"),
]


@pytest.mark.parametrize("label,change,field,problem", BAD_DEFINITIONS, ids=[b[0] for b in BAD_DEFINITIONS])
def test_bad_definition_is_refused_naming_the_field(label, change, field, problem, tmp_path, capsys):
    with pytest.raises(ConsortiumError) as info:
        parse_consortium(_mutated(change), source="consortium.yml")
    assert info.value.field == field
    message = str(info.value)
    assert f"field '{field}'" in message and problem in message and message.startswith("consortium.yml")
    assert isinstance(info.value, ConfigError)
    # Through the command: exit 2, one line naming the file and the field, nothing provisioned.
    path = write_consortium(tmp_path / "c.yml", _mutated(change))
    assert main(["consortium", "provision", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"clinfed: error: {path}: field '{field}': {info.value.problem}\n"
    assert not (tmp_path / "out").exists()


def test_bad_file_names_the_file_and_field(tmp_path):
    path = write_consortium(tmp_path / "c.yml", _mutated(lambda r: r["admins"][1].update(role="owner")))
    with pytest.raises(ConsortiumError, match=r"c\.yml: field 'admins\[1\]\.role': unknown role 'owner'"):
        load_consortium(path)
    (tmp_path / "broken.yml").write_text("sites: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_consortium(tmp_path / "broken.yml")


def test_project_yml_has_every_participant_with_its_org_and_role():
    c = load_consortium(CONSORTIUM_YML)
    project = project_yml(c)
    assert project["api_version"] == 3 and project["name"] == "clinfed-trial"
    by_name = {p["name"]: p for p in project["participants"]}
    assert by_name["server"] == {"name": "server", "type": "server", "org": "coordinator", "fed_learn_port": 8102,
                                 "default_host": "localhost"}
    assert [by_name[s]["type"] for s in c.site_names] == ["client"] * 4
    assert by_name["site-2"]["org"] == "hospital_2"
    assert by_name["lead@coordinator.org"]["role"] == "lead"
    assert by_name["member@hospital-1.org"] == {"name": "member@hospital-1.org", "type": "admin",
                                                "org": "hospital_1", "role": "member"}
    assert [b["path"].rsplit(".", 1)[-1] for b in project["builders"]] == [
        "WorkspaceBuilder", "StaticFileBuilder", "CertBuilder", "SignatureBuilder"]


def test_server_outcome_wait_goes_to_the_server_environment():
    from clinfed.consortium.provision import server_env

    c = load_consortium(CONSORTIUM_YML)
    assert c.coordinator.client_outcome_wait_timeout == 120
    assert server_env(c) == {"NVFLARE_CLIENT_OUTCOME_WAIT_TIMEOUT": "120.0"}
    bad = _mutated(lambda r: r["coordinator"].update(client_outcome_wait_timeout=0))
    with pytest.raises(ConsortiumError) as info:
        parse_consortium(bad)
    assert info.value.field == "coordinator.client_outcome_wait_timeout"


def test_authorization_refuses_byoc_to_everyone_and_submission_to_members():
    permissions = local_files.authorization()["permissions"]
    assert set(permissions) == {"project_admin", "org_admin", "lead", "member"}
    for role, rights in permissions.items():
        assert rights["byoc"] == "none", role
    assert permissions["member"]["submit_job"] == "none" and permissions["member"]["view"] == "any"
    assert permissions["lead"]["submit_job"] == "any"
    assert permissions["org_admin"]["submit_job"] == "none"


def test_strict_scope_is_the_release_guard_and_the_policy_goes_to_the_site_config():
    c = load_consortium(CONSORTIUM_YML)
    policy = local_files.privacy(c.site("site-1"), c.study)
    assert policy["default_scope"] == "strict" and [s["name"] for s in policy["scopes"]] == ["strict"]
    strict = policy["scopes"][0]
    assert [f["path"] for f in strict["task_result_filters"]] == [local_files.RELEASE_GUARD_FILTER]
    public = local_files.privacy(c.site("site-2"), c.study)
    assert public["default_scope"] == "public" and [s["name"] for s in public["scopes"]] == ["public", "strict"]
    assert public["scopes"][0]["task_result_filters"] == [] and public["scopes"][0]["task_data_filters"] == []
    # What the site requires of secure aggregation lives in its own clinfed_site.json.
    from clinfed.privacy.policy import parse_policy

    site1 = parse_policy(local_files.site_config(c, "site-1", None)["privacy"], "site-1")
    assert site1.secagg.min_participants == 3 and site1.update_dp[c.study].requirement.noise_multiplier == 1.0
    assert parse_policy(local_files.site_config(c, "site-2", None)["privacy"], "site-2").update_dp == {}


def test_generated_privacy_json_loads_in_flare(tmp_path):
    """FLARE's own privacy configurator builds every filter of every scope from our file."""
    from nvflare.apis.workspace import Workspace
    from nvflare.private.fed.app.fl_conf import create_privacy_manager

    from clinfed.filters.release_guard import ReleaseGuard

    c = load_consortium(CONSORTIUM_YML)
    (tmp_path / "startup").mkdir()
    local_files.write_json(tmp_path / "local" / "privacy.json", local_files.privacy(c.site("site-2"), c.study))
    manager = create_privacy_manager(Workspace(str(tmp_path), "site-2"), names_only=False)
    assert manager.is_policy_defined()
    assert manager.get_scope(None).name == "public"
    strict = manager.get_scope("strict")
    assert [type(f) for f in strict.task_result_filters["out"]] == [ReleaseGuard]
    assert manager.get_scope("lenient") is None


def test_allow_list_keeps_the_defaults_and_admits_clinfed():
    from clinfed.jobs.tumour_seg import EXTRA_ALLOWED_CLASSES

    default = {"format_version": 2, "class_list_enforcement_mode": "warn",
               "class_allow_list": ["nvflare.app_common.workflows.fedavg.FedAvg"], "servers": [{"x": 1}]}
    resources = local_files.allow_list(default)
    assert resources["class_allow_list"][0] == "nvflare.app_common.workflows.fedavg.FedAvg"
    assert "clinfed." in resources["class_allow_list"]
    assert set(EXTRA_ALLOWED_CLASSES) <= set(resources["class_allow_list"])
    assert resources["class_list_enforcement_mode"] == "enforce" and resources["servers"] == [{"x": 1}]
    assert default["class_allow_list"] == ["nvflare.app_common.workflows.fedavg.FedAvg"]  # input untouched


def test_server_storage_leaves_tmp(tmp_path):
    default = {"snapshot_persistor": {"args": {"storage": {"args": {"root_dir": "/tmp/nvflare/snapshot-storage"}}}},
               "components": [{"id": "job_manager", "args": {"uri_root": "/tmp/nvflare/jobs-storage"}}]}
    moved = local_files.move_server_storage(default, tmp_path)
    assert moved["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] == str(tmp_path / "snapshot-storage")
    assert moved["components"][0]["args"]["uri_root"] == str(tmp_path / "jobs-storage")


def test_site_config_and_fabric_mapping(tmp_path):
    c = load_consortium(CONSORTIUM_YML)
    config = local_files.site_config(c, "site-2", tmp_path / "ledger.sqlite", str(tmp_path / "data" / "site-2"))
    assert config["data_dir"] == str(tmp_path / "data" / "site-2")
    assert config["ledger"] == {"participant": "site-2", "backend": "local", "msp_id": "Site2MSP",
                                "outbox": "clinfed_ledger_outbox.jsonl", "policy": "async",
                                "path": str(tmp_path / "ledger.sqlite"), "head_file": "clinfed_ledger_head.json",
                                "cert": "../startup/client.crt", "key": "../startup/client.key",
                                "ca": "../startup/rootCA.pem"}
    server = local_files.site_config(c, "coordinator", tmp_path / "ledger.sqlite")
    assert "data_dir" not in server and server["ledger"]["msp_id"] == "CoordinatorMSP"
    orgs = local_files.fabric_orgs(c)
    assert orgs["fabric_network_sites"] == "site-1,site-2,site-3,site-4"
    assert orgs["coordinator"]["msp_id"] == "CoordinatorMSP"
    assert [s["fabric_org"] for s in orgs["sites"]] == ["Site1", "Site2", "Site3", "Site4"]
    assert local_files.flare_to_fabric(c) == {"server": "CoordinatorMSP", "site-1": "Site1MSP",
                                              "site-2": "Site2MSP", "site-3": "Site3MSP", "site-4": "Site4MSP"}


def test_fabric_ledger_needs_each_participants_peer():
    raw = _mutated(lambda r: r.update(ledger={"backend": "fabric", "participants": {
        "coordinator": {"endpoint": "peer0.coordinator:7051", "msp_dir": "m"},
        "site-1": {"endpoint": "peer0.site1:7051", "msp_dir": "m"}}}))
    with pytest.raises(ConsortiumError) as info:
        parse_consortium(raw)
    assert info.value.field == "ledger.participants.site-2"


def test_cli_refuses_a_bad_definition_with_exit_2(tmp_path, capsys):
    path = write_consortium(tmp_path / "c.yml", _mutated(lambda r: r["sites"][0]["privacy"]["update_dp"].update(
        epsilon=-1)))
    assert main(["consortium", "provision", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "field 'sites[0].privacy.update_dp.epsilon': must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
