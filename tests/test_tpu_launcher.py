"""launch.tpu: the gcloud commands a multi-host TPU gets (--dry-run) and the GKE JobSet manifest."""

import shlex

import pytest

from launch import tpu

TRAIN = "python3 -m launch.train --config=configs/gfdm.py:svd --workdir=gs://bucket/gfdm"
VM = ["--name=defi", "--zone=us-east5-a", "--project=proj", "--type=v5p-128", "--dry-run"]


def _commands(capsys, *argv):
    assert tpu.main(list(argv)) == 0
    out = capsys.readouterr().out.splitlines()
    return [shlex.split(line.removeprefix("[dry-run] ")) for line in out if line.startswith("[dry-run] ")], out


def test_create_spot_and_queued(capsys):
    (create,), out = _commands(capsys, "create", *VM, "--spot")
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "defi"]
    assert {"--zone=us-east5-a", "--project=proj", "--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5",
            "--spot"} <= set(create)
    assert "# v5p-128: 64 chips on 16 hosts (workers 0-15), gcloud accelerator type v5p-128" in out

    (queued,), _ = _commands(capsys, "create", *VM, "--queued")
    assert queued[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "defi"]
    assert {"--node-id=defi", "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5"} <= set(queued)
    assert "--spot" not in queued

    (v5e,), _ = _commands(capsys, "create", "--name=e", "--zone=z", "--type=v5e-16", "--dry-run")
    assert "--accelerator-type=v5litepod-16" in v5e and "--version=v2-alpha-tpuv5-lite" in v5e


def test_setup_copies_the_code_to_every_worker(capsys):
    (archive, scp, ssh), _ = _commands(capsys, "setup", *VM)
    assert archive[:2] == ["git", "-C"] and "archive" in archive and archive[-1] == "HEAD"
    tarball = next(a.split("=", 1)[1] for a in archive if a.startswith("--output="))
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert tarball in scp and "defi:~/defi-jax.tar.gz" in scp
    assert ssh[4] == "ssh" and "--worker=all" in ssh
    remote = next(a for a in ssh if a.startswith("--command=")).removeprefix("--command=")
    assert "tar -xzf ~/defi-jax.tar.gz" in remote and "pip install -q -e '.[tpu]'" in remote


def test_run_starts_the_same_command_on_every_worker_in_a_retry_loop(capsys):
    (ssh,), _ = _commands(capsys, "run", *VM, f"--command={TRAIN}", "--max-attempts=7")
    assert ssh[4:6] == ["ssh", "defi"] and "--worker=all" in ssh
    remote = next(a for a in ssh if a.startswith("--command=")).removeprefix("--command=")
    assert "setsid nohup bash -c" in remote and "> run.log" in remote and "echo $! > run.pid" in remote
    loop = shlex.split(remote.split("bash -c ", 1)[1])[0]  # the loop script bash runs
    assert "for attempt in $(seq 1 7)" in loop and f"do {TRAIN}; rc=$?" in loop
    assert "[ $rc -eq 0 ] && break" in loop and "echo $rc > run.exit" in loop


def test_run_watch_recreates_after_preemption(capsys):
    commands, out = _commands(capsys, "run", *VM, "--queued", "--spot", f"--command={TRAIN}", "--watch")
    verbs = [" ".join(c[3:5]) if c[0] == "gcloud" else c[0] for c in commands]
    assert verbs == ["tpu-vm ssh", "queued-resources delete", "queued-resources create", "git", "tpu-vm scp",
                     "tpu-vm ssh", "tpu-vm ssh"]
    assert "--spot" in commands[2] and commands[1][-2:] == ["--force", "--quiet"]
    assert any("after a preemption" in line for line in out)


def test_logs_stop_delete(capsys):
    (logs,), _ = _commands(capsys, "logs", *VM)
    assert "--worker=0" in logs and "--command=tail -n 200 -F ~/defi-jax/run.log" in logs
    (stop,), _ = _commands(capsys, "stop", *VM)
    assert "--worker=all" in stop and any("kill -TERM -- -$(cat run.pid)" in a for a in stop)
    (delete,), _ = _commands(capsys, "delete", *VM)
    assert delete[3:6] == ["tpu-vm", "delete", "defi"] and "--quiet" in delete
    (qdelete,), _ = _commands(capsys, "delete", *VM, "--queued")
    assert qdelete[3:6] == ["queued-resources", "delete", "defi"] and "--force" in qdelete


def test_bad_type_is_one_line(capsys):
    assert tpu.main(["create", "--name=x", "--zone=z", "--type=v5p-77", "--dry-run"]) == 2
    assert "--type='v5p-77'" in capsys.readouterr().err
    assert tpu.main(["create", "--name=x", "--zone=z", "--dry-run"]) == 2


@pytest.mark.parametrize("tpu_type, pods, topology, accelerator, chips", [
    ("v5p-128", 16, "4x4x4", "tpu-v5p-slice", 4), ("v4-32", 4, "2x2x4", "tpu-v4-podslice", 4),
    ("v6e-64", 16, "8x8", "tpu-v6e-slice", 4), ("v5e-8", 1, "2x4", "tpu-v5-lite-podslice", 8),
])
def test_jobset_manifest_parses_as_yaml(tmp_path, tpu_type, pods, topology, accelerator, chips):
    yaml = pytest.importorskip("yaml")
    out = tmp_path / "jobset.yaml"
    command = 'python3 -m launch.train --config=configs/gfdm.py:svd --workdir="gs://b/x" # it\'s: quoted'
    assert tpu.main(["manifest", f"--type={tpu_type}", "--image=us-docker.pkg.dev/p/r/defi:1",
                     f"--command={command}", "--num-slices=2", f"--out={out}"]) == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["apiVersion"].startswith("jobset.x-k8s.io/") and doc["kind"] == "JobSet"
    (job,) = doc["spec"]["replicatedJobs"]
    assert job["replicas"] == 2  # one per slice
    spec = job["template"]["spec"]
    assert spec["parallelism"] == spec["completions"] == pods
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": accelerator,
                                   "cloud.google.com/gke-tpu-topology": topology}
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["google.com/tpu"] == chips
    assert container["command"] == ["bash", "-c", command]
    assert container["image"] == "us-docker.pkg.dev/p/r/defi:1"


def test_to_yaml_round_trips():
    yaml = pytest.importorskip("yaml")
    value = {"a": [1, {"b": True, "c": None, "d": [], "e": {}}, [2.5, "x: y"]], "f": "multi\nline \"q\""}
    assert yaml.safe_load(tpu.to_yaml(value)) == value
