"""Stand-ins for ``kind``, ``kubectl``, ``helm``, ``docker`` and ``sleep`` to run kind_e2e.sh without a cluster.

Installed as one-line wrappers named after each tool (``tests/e2e/test_kind_script_mocked.py``)
that run ``python fake_cli.py TOOL ARGS...``. Every call is appended to ``$FAKE_CLI_LOG`` (one line, arguments
joined by spaces) and answered with canned output shaped like the real tool's, so that the
script's control flow (ordering, polling, fail-fast, the EXIT trap's diagnostics and cleanup)
runs for real. ``$FAKE_CLI_SCENARIO`` picks what goes wrong:

- ``ok``: everything succeeds (the job reports Running for a few polls, then Succeeded);
- ``job-fails``: the PyTorchJob turns Failed;
- ``gpu-check-misplaced``: the A100 check pod lands on the plain worker;
- ``cpu-on-gpu-node``: a tiny-cpu pod runs on the tainted GPU node;
- ``no-metrics``: the pods' metrics endpoints never answer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCENARIO = os.environ.get("FAKE_CLI_SCENARIO", "ok")
STATE = Path(os.environ["FAKE_CLI_STATE"])
GPU_NODE, CPU_NODE = "sam-e2e-worker2", "sam-e2e-worker"
POLLS_BEFORE_SUCCESS = 5


def count(name: str) -> int:
    """Calls so far of a counted query (kept in the state folder)."""
    path = STATE / f"count-{name}"
    n = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(n))
    return n


def kubectl(args: list[str]) -> int:
    line = " ".join(args)
    if "--raw" in args and "/proxy/metrics" in line:
        if SCENARIO == "no-metrics":
            print("Error from server (ServiceUnavailable): the server is currently unable to handle the request",
                  file=sys.stderr)
            return 1
        print('# HELP sam_train_step optimizer steps finished\n# TYPE sam_train_step gauge\n'
              f'sam_train_step{{run="sam-train",rank="0",local_rank="0",node="0"}} {float(count("scrape"))}')
    elif "allocatable" in line:
        print("8", end="")
    elif "range .items[*]" in line and "nodeName" in line:  # the job's pod placement
        node = GPU_NODE if SCENARIO == "cpu-on-gpu-node" else CPU_NODE
        print(f"sam-train-master-0={node}\nsam-train-worker-0={CPU_NODE}")
    elif "{.spec.nodeName}" in line:  # the A100 check's master pod
        print(CPU_NODE if SCENARIO == "gpu-check-misplaced" else GPU_NODE, end="")
    elif "{.status.phase}" in line:
        print("Succeeded", end="")
    elif "@.status==" in line:  # the PyTorchJob's true conditions
        if SCENARIO == "job-fails":
            print("Created Failed ", end="")
        else:
            print("Created Running " if count("conditions") < POLLS_BEFORE_SUCCESS else "Created Succeeded ", end="")
    elif '@.type=="Failed"' in line:
        print("PyTorchJob sam-train is failed because 1 Master replica(s) failed.", end="")
    elif "{.items[*].metadata.name}" in line:
        print("sam-train-master-0 sam-train-worker-0", end="")
    elif "initContainers" in line:
        print(" pytorch", end="")
    elif args[:1] == ["logs"]:
        if "check-checkpoint" in args:
            print("OK: checkpoint step 30 (= optim.max_iters) complete and verified; metrics.jsonl present")
        elif "synth-shards" in args:
            print("wrote 4 shards (48 images) to gs://sam-e2e/train")
        else:
            print('{"level": "INFO", "message": "training finished at step 30; checkpoints under gs://sam-e2e"}')
    else:
        print(f"fake kubectl: {line}")
    return 0


def kind(args: list[str]) -> int:
    if args[:2] == ["get", "clusters"]:
        return 0  # none yet
    if args[:2] == ["export", "logs"]:
        Path(args[2]).mkdir(parents=True, exist_ok=True)
        (Path(args[2]) / "kind-version.txt").write_text("fake\n")
    print(f"fake kind: {' '.join(args)}")
    return 0


def docker(args: list[str]) -> int:
    if args[:1] == ["version"]:
        print("docker 0.0.0-fake")
    elif args[:1] == ["build"]:
        print("Successfully tagged sam-train:e2e")
    return 0


def sleep(args: list[str]) -> int:
    # The script polls with sleeps of seconds; a tenth of the real time keeps the order of events.
    real = os.environ["FAKE_CLI_REAL_SLEEP"]
    return subprocess.call([real, str(min(float(args[0]) / 20, 0.2))])


def main() -> int:
    tool, args = sys.argv[1], sys.argv[2:]
    if tool != "sleep":
        with open(os.environ["FAKE_CLI_LOG"], "a") as log:
            log.write(f"{tool} {' '.join(args)}\n")
    handler = {"kubectl": kubectl, "kind": kind, "docker": docker, "sleep": sleep}.get(tool)
    if handler is None:
        print(f"fake_cli: {tool} {' '.join(args)}")
        return 0
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
