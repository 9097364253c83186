"""Submit the SAM training pipeline to a Kubeflow Pipelines API server (``kfp.Client``).

    python -m pipelines.submit --host http://localhost:8080 \\
        --param data_shards='gs://BUCKET/sa1b/sa_*.tar' --param run_dir=gs://BUCKET/runs/vit-h-1 \\
        --param eval_shards=gs://BUCKET/sa1b-val/sa_000999.tar --param preset=vit-h-a100 \\
        --set training.config.model.mae_checkpoint=gs://BUCKET/mae/mae_pretrain_vit_huge.pth \\
        --param namespace=ml --service-account pipeline-runner --wait

``--param NAME=VALUE`` sets a pipeline input; the value is read as the input's type in the
package (integers, booleans, JSON for ``list``/``dict`` inputs such as
``eval_tolerations='[...]'``). ``--set EXPR`` appends a Helm ``--set`` expression to the
``set_values`` input. Without ``--package`` the pipeline is compiled now (with
``SAM_TRAIN_IMAGE`` as the steps' image). ``--wait`` follows the run until it ends.

Exit codes: 0 submitted (with ``--wait``: the run Succeeded); 1 the run ended otherwise
(Failed, Canceled, Skipped); 2 bad flags or parameters (nothing sent); 3 the API server
refused or could not be reached; 124 ``--timeout`` passed while the run was still going.
"""

import argparse
import difflib
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import yaml

#: KFP v2beta1 run states after which nothing changes.
FINISHED_STATES = ("SUCCEEDED", "SKIPPED", "FAILED", "CANCELED")
EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE, EXIT_API, EXIT_TIMEOUT = 0, 1, 2, 3, 124


class UsageError(ValueError):
    """A flag or parameter cannot be used; nothing was sent."""


def package_inputs(package_path: str) -> dict[str, dict]:
    """``{name: {"parameterType": ..., "defaultValue": ..., "isOptional": ...}}`` of a compiled package."""
    with open(package_path) as f:
        doc = next(d for d in yaml.safe_load_all(f) if d and "root" in d)
    return dict(doc["root"].get("inputDefinitions", {}).get("parameters", {}))


def parse_value(name: str, text: str, parameter_type: str) -> Any:
    """``text`` as the pipeline input's type (``NUMBER_INTEGER``, ``BOOLEAN``, ``LIST``, ``STRUCT``, ...).

    Raises:
        UsageError: the text is not a value of that type; the message names the input.
    """
    try:
        if parameter_type == "NUMBER_INTEGER":
            return int(text)
        if parameter_type == "NUMBER_DOUBLE":
            return float(text)
        if parameter_type == "BOOLEAN":
            if text.lower() not in ("true", "false"):
                raise ValueError("want true or false")
            return text.lower() == "true"
        if parameter_type in ("LIST", "STRUCT"):
            value = json.loads(text)
            want = list if parameter_type == "LIST" else dict
            if not isinstance(value, want):
                raise ValueError(f"want a JSON {'array' if want is list else 'object'}")
            return value
    except ValueError as err:
        raise UsageError(f"--param {name}={text}: not a {parameter_type.lower()}: {err}") from None
    return text


def pipeline_arguments(inputs: dict[str, dict], params: Sequence[str], sets: Sequence[str]) -> dict[str, Any]:
    """The run's arguments from ``--param NAME=VALUE`` and ``--set EXPR`` flags.

    Raises:
        UsageError: a malformed flag, an unknown input (with the closest names), a bad value,
            or a required input left out.
    """
    arguments: dict[str, Any] = {}
    for item in params:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--param {item}: want NAME=VALUE")
        if name not in inputs:
            close = difflib.get_close_matches(name, inputs, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else f"; inputs: {', '.join(sorted(inputs))}"
            raise UsageError(f"--param {name}: the pipeline has no such input{hint}")
        arguments[name] = parse_value(name, text, inputs[name].get("parameterType", "STRING"))
    if sets:
        if "set_values" not in inputs:
            raise UsageError("--set: the pipeline has no set_values input")
        arguments["set_values"] = list(arguments.get("set_values", [])) + list(sets)
    missing = [name for name, spec in sorted(inputs.items())
               if not spec.get("isOptional") and "defaultValue" not in spec and name not in arguments]
    if missing:
        raise UsageError(f"missing required pipeline input(s): {', '.join(missing)} (pass --param NAME=VALUE)")
    return arguments


def wait_for_run(client: Any, run_id: str, timeout_s: float | None, interval_s: float = 10.0,
                 say: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic) -> str | None:
    """Poll the run until it finishes; print each new state. Returns the final state, or None on timeout."""
    start, last = clock(), None
    while True:
        state = str(client.get_run(run_id).state or "PENDING").upper()
        if state != last:
            say(f"[{clock() - start:6.0f}s] run {run_id}: {state}")
            last = state
        if state in FINISHED_STATES:
            return state
        if timeout_s is not None and clock() - start >= timeout_s:
            return None
        time.sleep(interval_s)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", required=True, help="KFP API server URL (e.g. http://localhost:8080 after "
                        "kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80)")
    parser.add_argument("--package", default=None, help="compiled pipeline YAML (default: compile it now)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a pipeline input")
    parser.add_argument("--set", action="append", default=[], metavar="EXPR", dest="sets",
                        help="a Helm --set expression for the job, appended to set_values")
    parser.add_argument("--experiment", default="sam-train", help="experiment name (default: %(default)s)")
    parser.add_argument("--run-name", default=None, help="run name (default: the package name and the time)")
    parser.add_argument("--namespace", default=None, help="KFP namespace (multi-user Kubeflow: your profile)")
    parser.add_argument("--service-account", default=None,
                        help="Kubernetes service account the run's pods use (needs the chart's launcherRbac)")
    parser.add_argument("--pipeline-root", default=None, help="where artifacts go (default: the server's)")
    parser.add_argument("--token", default=os.environ.get("KFP_TOKEN"),
                        help="bearer token for the API server (default: $KFP_TOKEN)")
    parser.add_argument("--wait", action="store_true", help="wait for the run to finish")
    parser.add_argument("--timeout", type=float, default=None, help="with --wait: seconds to wait (default: no limit)")
    parser.add_argument("--interval", type=float, default=10.0, help="with --wait: seconds between polls")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Compile (unless --package), check the parameters, create the run, optionally wait."""
    args = _parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        package = args.package
        try:
            if package is None:
                from pipelines.sam_pipeline import compile_pipeline

                package = compile_pipeline(os.path.join(tmp, "sam_pipeline.yaml"))
            elif not os.path.isfile(package):
                raise UsageError(f"--package {package}: no such file")
            arguments = pipeline_arguments(package_inputs(package), args.param, args.sets)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USAGE
        import kfp

        try:
            client = kfp.Client(host=args.host, existing_token=args.token)
            result = client.create_run_from_pipeline_package(
                package, arguments=arguments, run_name=args.run_name, experiment_name=args.experiment,
                namespace=args.namespace, pipeline_root=args.pipeline_root, service_account=args.service_account)
        except Exception as err:  # noqa: BLE001 - kfp_server_api, urllib3 and OSError all end here
            print(f"error: the KFP API server at {args.host} refused or could not be reached: "
                  f"{' '.join(str(err).split())[:500]}", file=sys.stderr)
            return EXIT_API
    print(f"submitted run {result.run_id}: {args.host.rstrip('/')}/#/runs/details/{result.run_id}")
    if not args.wait:
        return EXIT_OK
    try:
        state = wait_for_run(client, result.run_id, args.timeout, args.interval)
    except Exception as err:  # noqa: BLE001 - as above
        print(f"error: lost the KFP API server while waiting: {' '.join(str(err).split())[:500]}", file=sys.stderr)
        return EXIT_API
    if state is None:
        print(f"timed out after {args.timeout:g}s; the run goes on", file=sys.stderr)
        return EXIT_TIMEOUT
    return EXIT_OK if state == "SUCCEEDED" else EXIT_RUN_FAILED


if __name__ == "__main__":
    sys.exit(main())
