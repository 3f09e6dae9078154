"""Under `ray job submit` a relative output path is refused (the job's working dir is a temporary copy),
and a relative input only when the copy lacks it; outside a job, relative paths are the current dir."""

from __future__ import annotations

import pytest

from busdiff.config import ConfigError, load_config
from busdiff.jobpaths import JOB_ENV, check_job_paths, check_node_local_outputs


@pytest.fixture
def in_job(monkeypatch, tmp_path):
    monkeypatch.setenv(JOB_ENV, '{"runtime_env": {"working_dir": "."}}')
    monkeypatch.chdir(tmp_path)  # the job's copy of the working dir
    return tmp_path


def test_a_relative_output_is_refused_naming_the_field_and_why(in_job):
    cfg = load_config(None, ["generate.out=runs/generate-tiny"])
    with pytest.raises(ConfigError) as e:
        check_job_paths(cfg, "generate")
    msg = str(e.value)
    assert "generate.out='runs/generate-tiny' is a relative path" in msg
    assert "temporary copy of --working-dir" in msg and "deleted" in msg
    assert "--set generate.out=/" in msg


def test_absolute_paths_and_uris_pass_under_a_job(in_job):
    cfg = load_config(None, [f"generate.out={in_job}/gen", "finetune.out=s3://b/ft", f"data.root={in_job}"])
    check_job_paths(cfg, "generate")
    check_job_paths(cfg, "finetune")


def test_a_relative_input_passes_only_when_the_working_dir_copy_has_it(in_job):
    (in_job / "adapters").mkdir()
    ok = load_config(None, [f"generate.out={in_job}/gen", "generate.adapters=adapters"])
    check_job_paths(ok, "generate")
    missing = load_config(None, [f"generate.out={in_job}/gen", "generate.adapters=runs/finetune/adapters"])
    with pytest.raises(ConfigError, match=r"generate.adapters='runs/finetune/adapters' is a relative path.*"
                                          r"is not in that copy"):
        check_job_paths(missing, "generate")


def test_each_command_checks_the_paths_it_uses(in_job):
    cfg = load_config(None, ["data.root=/data/busi"])  # every output left at its relative default
    for command, field in [("finetune", "finetune.out"), ("evaluate", "evaluate.out"),
                           ("study", "study.out")]:
        with pytest.raises(ConfigError, match=f"{field}="):
            check_job_paths(cfg, command)
    with pytest.raises(ConfigError, match="model.miniature.cache_dir="):  # the miniature base's cache
        check_job_paths(load_config(None, ["model.preset=miniature", "finetune.out=/o", "data.root=/d"]),
                        "finetune")
    with pytest.raises(ConfigError, match="data.root="):  # the demo writes its phantoms into data.root
        check_job_paths(load_config(None, ["study.phantom_data=true", "study.out=/o",
                                           "evaluate.fid.cache_dir=/c", "data.root=runs/demo/phantom"]),
                        "study")


def test_relative_paths_are_the_current_dir_outside_a_job(monkeypatch):
    monkeypatch.delenv(JOB_ENV, raising=False)
    check_job_paths(load_config(None, ["generate.out=runs/x", "generate.adapters=missing"]), "generate")


def test_home_paths_pass_and_a_flag_is_named_as_a_flag(in_job):
    from busdiff.jobpaths import check_job_path

    check_job_path("generate.out", "~/busdiff/gen", output=True)  # every writer expands ~
    with pytest.raises(ConfigError, match=r"--json='r.json' is a relative path.*: --json /shared/busdiff/"):
        check_job_path("--json", "r.json", output=True)
    with pytest.raises(ConfigError, match="relative path"):
        check_job_path("generate.out", "file://runs/x", output=True)


def _nodes(*ips: str, dead: tuple[str, ...] = ()) -> list[dict]:
    return [{"NodeManagerAddress": ip, "Alive": True} for ip in ips] + [
        {"NodeManagerAddress": ip, "Alive": False} for ip in dead
    ]


def test_outputs_on_this_machines_disk_are_refused_when_other_hosts_would_write_them():
    for out, where in (("runs/gen", "a relative path"), ("/tmp/busdiff/gen", "under /tmp")):
        cfg = load_config(None, [f"generate.out={out}"])
        with pytest.raises(ConfigError) as e:
            check_node_local_outputs(cfg, "generate", _nodes("10.0.0.1", "10.0.0.7"), here="10.0.0.1")
        msg = str(e.value)
        assert msg.startswith(f"generate.out='{out}' is {where}, on this machine's own disk")
        assert "1 other host(s) (10.0.0.7)" in msg and "s3://" in msg


def test_shared_outputs_and_one_host_clusters_pass():
    nodes = _nodes("10.0.0.1", "10.0.0.7")
    for out in ("s3://bucket/gen", "/shared/busdiff/gen"):  # a URI, or maybe a shared mount
        check_node_local_outputs(load_config(None, [f"generate.out={out}"]), "generate", nodes, "10.0.0.1")
    local = load_config(None, ["generate.out=/tmp/gen", "study.out=runs/study"])
    # several raylets on one host (tests/multinode), or another host's node that is gone: same disk
    one_host = _nodes("10.0.0.1", "10.0.0.1", dead=("10.0.0.7",))
    check_node_local_outputs(local, "generate", one_host, "10.0.0.1")
    with pytest.raises(ConfigError, match=r"^study.out='runs/study' is a relative path"):
        check_node_local_outputs(local, "study", nodes, "10.0.0.1")
