"""``sam-train launch``: submit a training job to a Kubernetes cluster and follow it.

    sam-train launch submit demo -f charts/sam-train/presets/tiny-cpu.yaml -n ml \\
        --set training.dataShards='gs://b/sa_*.tar' --set training.runDir=gs://b/runs/demo --wait
    sam-train launch submit demo -f ... --dry-run   # print the YAML that would be submitted (no cluster)
    sam-train launch status demo -n ml              # state, replicas, pods
    sam-train launch wait demo -n ml --timeout 7200 # live status lines until Succeeded/Failed
    sam-train launch logs demo -n ml --follow       # the master's log (--replica worker --index 0)
    sam-train launch delete demo -n ml              # the job, its ConfigMap and its ServiceAccount
    sam-train launch list -n ml

``submit`` takes what ``helm install NAME charts/sam-train`` takes (``-f`` values files such as
the chart's presets, ``--set`` chart values) and submits the same objects the chart renders
(ConfigMap, ServiceAccount, PyTorchJob or TrainJob) through the Kubernetes API. The other
commands take the job's name or its release name (``demo`` finds ``demo-sam-train``).

Cluster: ``--kubeconfig`` (else ``$KUBECONFIG``, else in-cluster when ``KUBERNETES_SERVICE_HOST``
is set, else ``~/.kube/config``), ``--context``; the namespace defaults to the context's.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from trainer.launch.client import (PYTORCHJOB, TRAINJOB, JobRef, LaunchClient, LaunchError, connect,
                                   default_namespace)
from trainer.launch.watch import ExitCode, Watcher, format_status

EXIT_CODES = """\
exit codes:
  0    done (wait/--wait: the job Succeeded)
  1    the job Failed (the master's log tail and the job's events are printed)
  2    usage: bad flags, values (-f/--set) or kubeconfig/context; nothing was sent
  3    the API server refused: CRD not installed, forbidden, quota exceeded, invalid object,
       job exists (submit without --replace), job not found
  4    the API server cannot be reached (connection refused, DNS, TLS, timeout)
  5    --timeout passed while the job was Suspended (e.g. not admitted by Kueue)
  124  --timeout passed while the job was still running (it is left running)
  130  Ctrl-C while watching (the job was deleted, or left running: the message says which)
"""
KINDS = {"auto": None, "pytorchjob": PYTORCHJOB, "trainjob": TRAINJOB}


def _formatter() -> type[argparse.HelpFormatter]:
    from trainer.cli import HelpFormatter  # the shared one: keeps line breaks, appends defaults

    return HelpFormatter


def _cluster_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("cluster")
    group.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, "
                       "in-cluster config in a pod, else ~/.kube/config)")
    group.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
    group.add_argument("-n", "--namespace", default=None, help="namespace (default: the context's, else default)")
    return common


def _watch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="stop watching after this long (exit 124, or 5 while Suspended); default: no limit")
    parser.add_argument("--interval", type=float, default=10.0, metavar="SECONDS", help="seconds between polls")
    parser.add_argument("--delete-on-cancel", action="store_true",
                        help="on Ctrl-C delete the job without asking (default: ask on a terminal, "
                             "else leave it running)")


def _kind_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=sorted(KINDS), default="auto",
                        help="job kind to look for (auto: PyTorchJob, then TrainJob)")


def build_parser() -> argparse.ArgumentParser:
    """The ``sam-train launch`` parser (its ``--help`` needs no cluster)."""
    formatter = _formatter()
    common = _cluster_options()
    parser = argparse.ArgumentParser(prog="sam-train launch", description=(__doc__ or "").replace("``", "`"),
                                     epilog=EXIT_CODES,
                                     formatter_class=formatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     help="what to do (each has its own --help)")

    def command(name: str, func: Callable[[argparse.Namespace], int], summary: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=summary, description=summary, epilog=EXIT_CODES,
                                  formatter_class=formatter)
        sub.set_defaults(func=func)
        return sub

    submit = command("submit", _submit, "submit a job (the chart's objects), like `helm install NAME`")
    submit.add_argument("name", metavar="NAME", help="release name (the job is NAME, or NAME-sam-train)")
    submit.add_argument("-f", "--values", action="append", default=[], metavar="FILE",
                        help="chart values file, repeatable, later wins "
                             "(e.g. charts/sam-train/presets/vit-h-a100.yaml)")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_values",
                        help="chart value, Helm's --set syntax (training.runDir=gs://b/r, nodes=4), repeatable")
    submit.add_argument("--dry-run", action="store_true", help="print the YAML that would be submitted and exit")
    submit.add_argument("--replace", action="store_true",
                        help="if the job exists, delete it (and wait until it is gone) and submit again")
    submit.add_argument("--wait", action="store_true", help="watch the job until it Succeeds or Fails")
    _watch_options(submit)

    status = command("status", _status, "print a job's state, replica counts and pods")
    status.add_argument("name", metavar="NAME", help="job or release name")
    _kind_option(status)

    wait = command("wait", _wait, "watch a job until it Succeeds or Fails (live status lines)")
    wait.add_argument("name", metavar="NAME", help="job or release name")
    _watch_options(wait)
    _kind_option(wait)

    logs = command("logs", _logs, "print the log of one replica's training container (default: the master)")
    logs.add_argument("name", metavar="NAME", help="job or release name")
    logs.add_argument("--follow", action="store_true", help="stream the log until the container exits")
    logs.add_argument("--replica", choices=("master", "worker"), default="master",
                      help="replica type (TrainJob: master = node 0, worker i = node i+1)")
    logs.add_argument("--index", type=int, default=0, help="replica index (workers: 0 ... nodes-2)")
    logs.add_argument("--tail", type=int, default=None, metavar="LINES", help="only the last LINES lines")
    _kind_option(logs)

    delete = command("delete", _delete, "delete a job and the ConfigMap and ServiceAccount created with it")
    delete.add_argument("name", metavar="NAME", help="job or release name")
    delete.add_argument("--propagation", choices=("Foreground", "Background"), default="Foreground",
                        help="propagationPolicy: Foreground removes the pods before the job")
    _kind_option(delete)

    command("list", _list, "list the PyTorchJobs and TrainJobs of the namespace with their states")
    return parser


def _client(args: argparse.Namespace) -> LaunchClient:
    return connect(args.kubeconfig, args.context, args.namespace)


def _find(client: LaunchClient, args: argparse.Namespace) -> JobRef:
    return client.find_job(args.name, KINDS[getattr(args, "kind", "auto")])


def render_objects(args: argparse.Namespace, namespace: str) -> list[dict[str, Any]]:
    """The objects ``submit`` sends: the chart's ConfigMap, ServiceAccount and job for the values."""
    from trainer.launch.build import build_objects
    from trainer.launch.spec import JobSpec

    spec = JobSpec.load(args.values, args.set_values, name=args.name, namespace=namespace)
    return build_objects(spec)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """A multi-document YAML stream, keys in the objects' order (what ``--dry-run`` prints).

    Multi-line strings (the ConfigMap's config.toml) are written as ``|`` blocks, readable as
    ``kubectl get -o yaml`` shows them; they load back to the same strings.
    """
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
        return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)

    Dumper.add_representer(str, represent_str)
    return yaml.dump_all(objects, Dumper=Dumper, sort_keys=False, explicit_start=True, default_flow_style=False)


def _submit(args: argparse.Namespace) -> int:
    namespace = args.namespace or default_namespace(args.kubeconfig, args.context)
    objects = render_objects(args, namespace)
    if args.dry_run:
        print(to_yaml(objects), end="")
        return ExitCode.OK
    client = connect(args.kubeconfig, args.context, namespace)
    ref = client.submit(objects, replace=args.replace, say=print)
    print(f"watch:  sam-train launch wait {ref.name} -n {ref.namespace}\n"
          f"logs:   sam-train launch logs {ref.name} -n {ref.namespace} --follow\n"
          f"delete: {ref.delete_command()}")
    return _watch(client, ref, args) if args.wait else ExitCode.OK


def _wait(args: argparse.Namespace) -> int:
    client = _client(args)
    return _watch(client, _find(client, args), args)


def _watch(client: LaunchClient, ref: JobRef, args: argparse.Namespace) -> int:
    """Watch until the end; Ctrl-C deletes (--delete-on-cancel), asks (on a TTY) or leaves the job."""
    watcher = Watcher(client, ref, interval=args.interval, timeout=args.timeout or None)
    try:
        return watcher.run().exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return _cancel(client, ref, args.delete_on_cancel)


def _ask(question: str) -> bool:
    try:
        return input(question).strip().lower() in ("y", "yes")
    except (EOFError, KeyboardInterrupt):  # a second Ctrl-C or a closed stdin means no
        return False


def _cancel(client: LaunchClient, ref: JobRef, delete: bool) -> int:
    if delete or (sys.stdin.isatty() and _ask(f"delete {ref.describe()}? [y/N] ")):
        for line in client.delete(ref):
            print(line)
    else:
        print(f"{ref.describe()} is left running; delete it with: {ref.delete_command()}")
    return ExitCode.INTERRUPTED


def _status(args: argparse.Namespace) -> int:
    client = _client(args)
    ref = _find(client, args)
    job = client.get_job(ref)
    print(format_status(ref.kind.kind, ref.namespace, ref.name, client.status(ref, job)))
    status = job.get("status") or {}
    for key in ("startTime", "completionTime"):
        if status.get(key):
            print(f"  {key}: {status[key]}")
    for pod in sorted(client.pods(ref), key=lambda p: p.metadata.name):
        restarts = sum(c.restart_count or 0 for c in (pod.status.container_statuses or ())) if pod.status else 0
        phase = pod.status.phase if pod.status else "?"
        print(f"  pod {pod.metadata.name}: {phase}, {restarts} restarts, node {pod.spec.node_name or '-'}")
    return ExitCode.OK


def _logs(args: argparse.Namespace) -> int:
    client = _client(args)
    ref = _find(client, args)
    if args.follow:
        client.follow_logs(ref, sys.stdout, args.replica, args.index, args.tail)
    else:
        _, _, text = client.logs(ref, args.replica, args.index, args.tail)
        sys.stdout.write(text)
    return ExitCode.OK


def _delete(args: argparse.Namespace) -> int:
    client = _client(args)
    for line in client.delete(_find(client, args), args.propagation):
        print(line)
    return ExitCode.OK


def _list(args: argparse.Namespace) -> int:
    client = _client(args)
    jobs = client.list_jobs()
    if not jobs:
        print(f"no PyTorchJob or TrainJob in namespace {client.namespace}")
    for ref, job in sorted(jobs, key=lambda item: item[0].name):
        created = job.get("metadata", {}).get("creationTimestamp", "")
        print(f"{ref.kind.kind:10s} {ref.name:40s} {client.status(ref, job).state.value:10s} {created}")
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    """Run one ``sam-train launch`` command; errors print one line to stderr (codes in --help)."""
    from trainer.launch.spec import SpecError

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args))
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return int(err.exit_code)
    except SpecError as err:  # -f/--set values the chart would refuse
        print(f"error: {err}", file=sys.stderr)
        return int(ExitCode.USAGE)


if __name__ == "__main__":
    sys.exit(main())
