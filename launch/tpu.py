"""Cloud TPU VMs for defi-jax through gcloud: create, setup, run, logs, stop, delete; GKE JobSet manifests.

    python -m launch.tpu create --name=defi --zone=us-east5-a --type=v5p-128 --spot
    python -m launch.tpu create --name=defi --zone=us-east5-a --type=v5p-128 --queued   # queued resource
    python -m launch.tpu setup  --name=defi --zone=us-east5-a        # git archive HEAD -> every worker; pip install
    python -m launch.tpu run    --name=defi --zone=us-east5-a --watch --type=v5p-128 --spot \\
        --command="python3 -m launch.train --config=configs/gfdm.py:svd --workdir=gs://bucket/gfdm"
    python -m launch.tpu logs   --name=defi --zone=us-east5-a        # follows worker 0's log
    python -m launch.tpu stop   --name=defi --zone=us-east5-a        # SIGTERM: the trainer saves and exits
    python -m launch.tpu delete --name=defi --zone=us-east5-a [--queued]
    python -m launch.tpu manifest --type=v5p-128 --image=IMAGE --command="python3 -m launch.train ..." > jobset.yaml

Every subcommand takes ``--dry-run`` (print each command instead of running it) and ``--project``.

``run`` starts the same command on every worker (``ssh --worker=all``), detached (``nohup``, log in
``~/defi-jax/run.log``), inside a loop that reruns it when it exits non-zero (a lost worker, a crash): the
trainer resumes from its workdir by itself, so give it a ``gs://`` workdir. A preempted VM takes that loop
with it: ``run --watch`` stays in the foreground, polls the TPU, and when it was preempted deletes it,
creates it again (``--type``, ``--spot`` / ``--queued`` as at ``create``), sets it up and starts the
command again; it returns when the command has exited 0 (worker 0's exit status).

``manifest`` writes a JobSet for GKE (what XPK submits): one replicated job per slice of N pods (one per
TPU VM host, e.g. 16 for v5p-128) with the TPU node selectors and ``google.com/tpu`` limits; the JobSet
restarts on failure or preemption (``--max-restarts``) and the trainer resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "~/defi-jax"  # the code on every worker; run.log, run.pid and run.exit live here

# Software versions of TPU VM images (cloud.google.com/tpu/docs/runtimes).
RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
           "v6e": "v2-alpha-tpuv6e"}
# Node labels of GKE TPU node pools (cloud.google.com/kubernetes-engine/docs/concepts/plan-tpus).
GKE_ACCELERATOR = {"v4": "tpu-v4-podslice", "v5e": "tpu-v5-lite-podslice", "v5p": "tpu-v5p-slice",
                   "v6e": "tpu-v6e-slice"}
READY, GONE = ("READY", "ACTIVE"), ("PREEMPTED", "TERMINATED", "SUSPENDED", "FAILED", "NOT_FOUND")


def _topology(name: str):
    from defi_jax import aot
    return aot.parse_topology(name, flag="--type")


def accelerator_type(topology) -> str:
    """gcloud's name: v5p-128 / v4-32 count TensorCores, v5e is ``v5litepod-<chips>``, v6e ``v6e-<chips>``."""
    chip = topology.chip
    prefix = "v5litepod" if chip.name == "v5e" else chip.name
    return f"{prefix}-{topology.chips_per_slice * chip.cores_per_chip}"


class Gcloud:
    """Builds (and with ``dry_run=False`` runs) the gcloud commands of one TPU VM or queued resource."""

    def __init__(self, name: str, zone: str, project: str | None = None, dry_run: bool = False):
        self.name, self.zone, self.project, self.dry_run = name, zone, project, dry_run

    def _where(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

    def vm(self, verb: str, *args: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, self.name, *self._where(), *args]

    def queued(self, verb: str, *args: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "queued-resources", verb, self.name, *self._where(), *args]

    def ssh(self, command: str, worker: str = "all") -> list[str]:
        return self.vm("ssh", f"--worker={worker}", f"--command={command}")

    def execute(self, argv: list[str], *, check: bool = True, capture: bool = False) -> str:
        """Prints the command; runs it unless dry-run. Returns its stdout when ``capture``."""
        print(("[dry-run] " if self.dry_run else "+ ") + shlex.join(argv), flush=True)
        if self.dry_run:
            return ""
        proc = subprocess.run(argv, check=check, text=True, capture_output=capture)
        return proc.stdout.strip() if capture else ""


def create_commands(g: Gcloud, tpu_type: str, *, spot: bool, queued: bool, version: str | None) -> list[list[str]]:
    topology = _topology(tpu_type)
    version = version or RUNTIME[topology.chip.name]
    accel = accelerator_type(topology)
    if queued:
        return [g.queued("create", f"--node-id={g.name}", f"--accelerator-type={accel}",
                         f"--runtime-version={version}", *(["--spot"] if spot else []))]
    return [g.vm("create", f"--accelerator-type={accel}", f"--version={version}", *(["--spot"] if spot else []))]


def setup_commands(g: Gcloud, tarball: str) -> list[list[str]]:
    """The committed code (``git archive HEAD``) to every worker, then ``pip install -e .[tpu]`` there."""
    install = (f"mkdir -p {REMOTE_DIR} && tar -xzf ~/defi-jax.tar.gz -C {REMOTE_DIR} && cd {REMOTE_DIR} && "
               f"python3 -m pip install -q -U pip && python3 -m pip install -q -e '.[tpu]'")
    return [["git", "-C", ROOT, "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"],
            g.vm("scp", tarball, f"{g.name}:~/defi-jax.tar.gz", "--worker=all"),
            g.ssh(install)]


def run_script(command: str, max_attempts: int = 100, retry_delay_s: int = 30) -> str:
    """The shell line every worker runs: ``command`` detached, rerun until it exits 0 (it resumes)."""
    loop = (f"rc=1; for attempt in $(seq 1 {max_attempts}); do {command}; rc=$?; [ $rc -eq 0 ] && break; "
            f"echo \"[launch.tpu] attempt $attempt exited with $rc; rerunning in {retry_delay_s} s "
            f"(the trainer resumes from its workdir)\"; sleep {retry_delay_s}; done; echo $rc > run.exit")
    # setsid: the loop and the trainer form one process group, which `stop` signals as a whole.
    return (f"cd {REMOTE_DIR} && rm -f run.exit && (setsid nohup bash -c {shlex.quote(loop)} "
            f"> run.log 2>&1 < /dev/null & echo $! > run.pid)")


STATUS_SCRIPT = (f"cd {REMOTE_DIR} && if [ -f run.exit ]; then echo exit=$(cat run.exit); "
                 f"elif [ -f run.pid ] && kill -0 $(cat run.pid) 2>/dev/null; then echo running; else echo dead; fi")
STOP_SCRIPT = f"cd {REMOTE_DIR} && [ -f run.pid ] && kill -TERM -- -$(cat run.pid) || true"
LOGS_SCRIPT = f"tail -n 200 -F {REMOTE_DIR}/run.log"


def tpu_state(g: Gcloud, queued: bool) -> str:
    """READY / ACTIVE, PREEMPTED, SUSPENDED, ... or NOT_FOUND."""
    argv = (g.queued("describe", "--format=value(state.state)") if queued
            else g.vm("describe", "--format=value(state)"))
    print("+ " + shlex.join(argv), flush=True)
    proc = subprocess.run(argv, text=True, capture_output=True)
    return proc.stdout.strip() if proc.returncode == 0 else "NOT_FOUND"


def watch(g: Gcloud, a, tarball: str) -> int:
    """Polls the TPU and the job; after a preemption recreates the TPU, sets it up and reruns the command."""
    start = [g.ssh(run_script(a.command, a.max_attempts))]
    recreate = ([g.queued("delete", "--force", "--quiet")] if a.queued else [g.vm("delete", "--quiet")])
    recreate += create_commands(g, a.type, spot=a.spot, queued=a.queued, version=a.version)
    if g.dry_run:
        print(f"# then every {a.poll_s} s: the TPU's state and `{STATUS_SCRIPT}` on worker 0; after a "
              f"preemption (state in {GONE}):")
        for argv in recreate + setup_commands(g, tarball) + start:
            g.execute(argv)
        return 0
    while True:
        time.sleep(a.poll_s)
        state = tpu_state(g, a.queued)
        if state in GONE:
            print(f"[launch.tpu] {g.name} is {state}: recreating it", flush=True)
            for argv in recreate:
                g.execute(argv, check=False)
            while tpu_state(g, a.queued) not in READY:
                time.sleep(a.poll_s)
            for argv in setup_commands(g, tarball) + start:
                g.execute(argv)
        elif state in READY:
            status = g.execute(g.ssh(STATUS_SCRIPT, worker="0"), check=False, capture=True)
            if status == "exit=0":
                print(f"[launch.tpu] the command finished on {g.name}", flush=True)
                return 0
            if status.startswith("exit="):
                print(f"[launch.tpu] the command gave up ({status}); see `launch.tpu logs`", flush=True)
                return 1
            if status == "dead":  # the VM restarted under it (maintenance): start it again
                for argv in start:
                    g.execute(argv)


# ---------------------------------------------------------------------------------------------- manifest
def jobset_manifest(tpu_type: str, image: str, command: str, *, name: str = "defi-jax", num_slices: int = 1,
                    max_restarts: int = 10, spot: bool = False) -> dict:
    """A JobSet: ``num_slices`` replicas of a job with one pod per TPU VM host of ``tpu_type``."""
    topology = _topology(tpu_type)
    selector = {"cloud.google.com/gke-tpu-accelerator": GKE_ACCELERATOR[topology.chip.name],
                "cloud.google.com/gke-tpu-topology": "x".join(map(str, topology.grid))}
    if spot:
        selector["cloud.google.com/gke-spot"] = "true"
    chips_per_host = topology.chips_per_slice // topology.hosts
    pod = {
        "restartPolicy": "Never",
        "nodeSelector": selector,
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "terminationGracePeriodSeconds": 60,  # SIGTERM on preemption: time for the trainer to save
        "containers": [{
            "name": "defi-jax",
            "image": image,
            "command": ["bash", "-c", command],
            "ports": [{"containerPort": 8471}, {"containerPort": 8080}],  # as XPK's TPU workloads
            "securityContext": {"privileged": True},
            "resources": {"limits": {"google.com/tpu": chips_per_host}},
        }],
    }
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name,
                     # one slice per node pool
                     "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
        "spec": {
            "failurePolicy": {"maxRestarts": max_restarts},
            "replicatedJobs": [{
                "name": "slice",
                "replicas": num_slices,
                "template": {"spec": {"parallelism": topology.hosts, "completions": topology.hosts,
                                      "backoffLimit": 0, "template": {"spec": pod}}},
            }],
        },
    }


def to_yaml(value, indent: int = 0) -> str:
    """Block-style YAML of dicts, lists and scalars; strings are JSON-quoted (valid YAML scalars)."""
    pad = " " * indent
    if isinstance(value, (dict, list)) and not value:
        return "{}" if isinstance(value, dict) else "[]"
    if isinstance(value, dict):
        lines = []
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{k}:\n{to_yaml(v, indent + 2)}")
            else:
                lines.append(f"{pad}{k}: {to_yaml(v)}")
        return "\n".join(lines)
    if isinstance(value, list):
        lines = []
        for v in value:
            if isinstance(v, (dict, list)) and v:
                body = to_yaml(v, indent + 2)
                lines.append(f"{pad}- {body[indent + 2:]}")
            else:
                lines.append(f"{pad}- {to_yaml(v)}")
        return "\n".join(lines)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(str(value))


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)

    def vm_parser(verb, help):
        # Every VM verb takes the same flags, so one set of flags serves create ... delete.
        s = sub.add_parser(verb, help=help)
        s.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
        s.add_argument("--zone", required=True)
        s.add_argument("--project", default=None, help="default: gcloud's configured project")
        s.add_argument("--type", help="accelerator: v5p-128, v4-32, v5e-256, v6e-64, ... (create, run --watch)")
        s.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
        s.add_argument("--queued", action="store_true", help="through a queued resource")
        s.add_argument("--version", default=None, help="TPU VM software version (default per generation)")
        s.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
        return s

    vm_parser("create", "create the TPU VM or queued resource")
    vm_parser("setup", "copy the committed code to every worker and pip install it")
    r = vm_parser("run", "start --command on every worker (detached, rerun until it exits 0)")
    r.add_argument("--command", required=True, help="e.g. 'python3 -m launch.train --config=... --workdir=gs://...'")
    r.add_argument("--max-attempts", type=int, default=100, help="reruns on one VM before giving up")
    r.add_argument("--watch", action="store_true", help="stay, recreate the TPU after preemption, rerun")
    r.add_argument("--poll-s", type=int, default=300, help="--watch: seconds between checks")
    vm_parser("logs", "follow worker 0's log")
    vm_parser("stop", "SIGTERM the command on every worker (the trainer saves and exits)")
    vm_parser("delete", "delete the TPU VM (or, with --queued, the queued resource with its VM)")

    m = sub.add_parser("manifest", help="write a GKE JobSet manifest (YAML) to --out or stdout")
    m.add_argument("--type", required=True)
    m.add_argument("--image", required=True, help="container image with defi-jax installed ('.[tpu]')")
    m.add_argument("--command", required=True)
    m.add_argument("--name", default="defi-jax", help="JobSet name")
    m.add_argument("--num-slices", type=int, default=1)
    m.add_argument("--max-restarts", type=int, default=10)
    m.add_argument("--spot", action="store_true")
    m.add_argument("--out", default=None)
    return p


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    try:
        if a.verb in ("create", "manifest") or (a.verb == "run" and a.watch):
            if not a.type:
                raise ValueError(f"{a.verb}{' --watch' if a.verb == 'run' else ''} needs --type (e.g. v5p-128)")
        t = _topology(a.type) if a.type else None
        if a.verb == "manifest":
            text = to_yaml(jobset_manifest(a.type, a.image, a.command, name=a.name, num_slices=a.num_slices,
                                           max_restarts=a.max_restarts, spot=a.spot)) + "\n"
            if a.out:
                with open(os.path.abspath(a.out), "w") as f:
                    f.write(text)
            else:
                sys.stdout.write(text)
            return 0
    except ValueError as e:  # a bad or missing --type
        print(f"launch.tpu: {e}", file=sys.stderr)
        return 2
    g = Gcloud(a.name, a.zone, a.project, a.dry_run)
    tarball = os.path.join("/tmp", f"defi-jax-{a.name}.tar.gz")
    if t is not None:
        print(f"# {a.type}: {t.chips_per_slice} chips on {t.hosts} host{'s' if t.hosts > 1 else ''} "
              f"(workers 0-{t.hosts - 1}), gcloud accelerator type {accelerator_type(t)}", flush=True)
    try:
        if a.verb == "create":
            commands = create_commands(g, a.type, spot=a.spot, queued=a.queued, version=a.version)
        elif a.verb == "setup":
            if not a.dry_run and subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD"]).returncode:
                print("launch.tpu: uncommitted changes are not copied (git archive HEAD)", file=sys.stderr)
            commands = setup_commands(g, tarball)
        elif a.verb == "run":
            commands = [g.ssh(run_script(a.command, a.max_attempts))]
        elif a.verb == "logs":
            commands = [g.ssh(LOGS_SCRIPT, worker="0")]
        elif a.verb == "stop":
            commands = [g.ssh(STOP_SCRIPT)]
        else:  # delete
            commands = [g.queued("delete", "--force", "--quiet") if a.queued else g.vm("delete", "--quiet")]
        for argv in commands:
            g.execute(argv)
        if a.verb == "run" and a.watch:
            return watch(g, a, tarball)
    except subprocess.CalledProcessError as e:
        print(f"launch.tpu: `{shlex.join(e.cmd)}` exited with {e.returncode}", file=sys.stderr)
        return e.returncode or 1
    except FileNotFoundError as e:  # no gcloud
        print(f"launch.tpu: {e.filename} not found; install the Google Cloud SDK (or use --dry-run)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
