#!/usr/bin/env bash
# End-to-end test on a kind cluster: the trainer image as a 2-node PyTorchJob (training-operator
# v1.9.4) on CPU, data and checkpoints on an in-cluster GCS emulator, plus a scheduling check of
# the A100 node-pool presets against a worker dressed up as an A100 node.
#
#   tests/e2e/kind_e2e.sh                    # from the repository root; needs docker, kind, kubectl, helm
#
# Environment:
#   DEPLOY=helm|kustomize  how the training job is installed: `helm install` of the chart with
#                          tests/e2e/values-kind.yaml (default), or `kubectl apply -k
#                          manifests/overlays/kind-cpu` (the generated kustomize overlay, same objects)
#   KEEP_CLUSTER=1         leave the cluster running at the end (default: delete it)
#   SKIP_BUILD=1           use an existing local image sam-train:e2e instead of building it
#   TIMEOUT_S=900          how long the training job may take to succeed
#   DIAG_DIR=...           where diagnostics go on failure (default: $RUNNER_TEMP or /tmp, sam-e2e-diagnostics)
#
# Steps: (0) start the CPU image build in the background; (1) create the cluster; (2) dress one
# worker as an A100 node; (3) install the training operator; (4) load the image; (5) check that
# the A100 presets schedule onto that node; (6) fake-gcs-server + synthetic shards; (7) install
# the job; (8) wait for Succeeded while scraping both pods' metrics; (9) check the checkpoint,
# the scrapes and the placement. On failure the EXIT trap dumps diagnostics into $DIAG_DIR.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

CLUSTER_NAME="${CLUSTER_NAME:-sam-e2e}"
DEPLOY="${DEPLOY:-helm}"
KEEP_CLUSTER="${KEEP_CLUSTER:-0}"
SKIP_BUILD="${SKIP_BUILD:-0}"
TIMEOUT_S="${TIMEOUT_S:-900}"
DIAG_DIR="${DIAG_DIR:-${RUNNER_TEMP:-/tmp}/sam-e2e-diagnostics}"

# Fixed by the kind-cpu overlay and tests/e2e/values-kind.yaml (namespace, names, image, bucket).
# The release is named like the chart, so its full name (and the PyTorchJob's) is just `sam-train`,
# the name the generated kustomize tree uses too: both DEPLOY modes create the same objects.
NS=sam-e2e
JOB=sam-train                  # release name = PyTorchJob name; pods $JOB-master-0, $JOB-worker-0
IMAGE=sam-train:e2e
BUCKET=sam-e2e
RUN_URL="gs://$BUCKET/runs/e2e"
METRICS_PORT=9400              # the chart's monitoring.port (tiny-cpu keeps the default)
EMULATOR_ENV=(--env=STORAGE_EMULATOR_HOST=http://fake-gcs:4443 --env=SAM_GCS_TOKEN=anon
              --env=GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false)

# The job's values: the same two files the kind-cpu overlay is generated from.
JOB_VALUES=(-f charts/sam-train/presets/tiny-cpu.yaml -f tests/e2e/values-kind.yaml)
# The scheduling check's values: a paper preset shrunk to 1 pod with 1 (fake) GPU.
CHECK_VALUES=(-f charts/sam-train/presets/vit-b-a100.yaml -f tests/e2e/values-a100-check.yaml)
# release:nodePool.preset pairs of the scheduling check (both select the node labelled below).
A100_CHECKS=(a100-gfd:gpu-operator-a100-80gb a100-gke:gke-a2-ultragpu)

# The worker dressed as an A100 80 GB node: GPU Operator (GFD) and GKE labels, the GKE GPU-pool
# taint, and 8 fake nvidia.com/gpu on its status (LAUNCH.md §6/§7).
GPU_NODE="$CLUSTER_NAME-worker2"
GPU_NODE_LABELS=(nvidia.com/gpu.present=true nvidia.com/gpu.product=NVIDIA-A100-SXM4-80GB
                 cloud.google.com/gke-accelerator=nvidia-a100-80gb)
GPU_NODE_TAINT=nvidia.com/gpu=present:NoSchedule
FAKE_GPUS=8

# training-operator v1.9.4, standalone overlay (LAUNCH.md §1). The repository was renamed
# kubeflow/training-operator -> kubeflow/trainer; GitHub redirects the old name, but the
# canonical one does not depend on that redirect. Tag v1.9.4 is on the release-1.9 line.
OPERATOR_KUSTOMIZE="github.com/kubeflow/trainer.git/manifests/overlays/standalone?ref=v1.9.4"

WORK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/sam-e2e.XXXXXX")"
export KUBECONFIG="$WORK_DIR/kubeconfig"   # kind writes its context here, not into ~/.kube/config
BG_PIDS=()
CLUSTER_CREATED=0

say() { printf '\n=== %s [%s]\n' "$*" "$(date -u +%H:%M:%S)"; }
run() { printf '+ %s\n' "$*"; "$@"; }
fail() { printf 'E2E FAILURE: %s\n' "$*" >&2; exit 1; }

# retry ATTEMPTS DELAY_S CMD...: for steps racing a webhook or the network.
retry() {
  local attempts=$1 delay=$2 i
  shift 2
  for ((i = 1; i <= attempts; i++)); do
    if run "$@"; then return 0; fi
    (( i < attempts )) && { echo "attempt $i/$attempts failed; retrying in ${delay}s"; sleep "$delay"; }
  done
  return 1
}

# ----------------------------------------------------------------------------- diagnostics

collect_diagnostics() {
  mkdir -p "$DIAG_DIR/pods"
  echo "collecting diagnostics into $DIAG_DIR"
  cp -r "$WORK_DIR"/. "$DIAG_DIR/work" 2>/dev/null
  rm -f "$DIAG_DIR/work/kubeconfig"
  (( CLUSTER_CREATED )) || return 0
  kubectl get nodes -o wide --show-labels >"$DIAG_DIR/nodes.txt" 2>&1
  kubectl describe nodes >"$DIAG_DIR/nodes-describe.txt" 2>&1
  kubectl get pytorchjobs -A -o yaml >"$DIAG_DIR/pytorchjobs.yaml" 2>&1
  kubectl describe pytorchjobs -A >"$DIAG_DIR/pytorchjobs-describe.txt" 2>&1
  kubectl get all,configmaps,serviceaccounts -A -o wide >"$DIAG_DIR/objects.txt" 2>&1
  kubectl describe pods -n "$NS" >"$DIAG_DIR/pods-describe.txt" 2>&1
  kubectl get events -A --sort-by=.metadata.creationTimestamp >"$DIAG_DIR/events.txt" 2>&1
  kubectl logs -n kubeflow deployment/training-operator --all-containers --tail=-1 \
    >"$DIAG_DIR/training-operator.log" 2>&1
  helm list -A >"$DIAG_DIR/helm-releases.txt" 2>&1
  local pod container
  for pod in $(kubectl get pods -n "$NS" -o jsonpath='{.items[*].metadata.name}' 2>/dev/null); do
    for container in $(kubectl get pod -n "$NS" "$pod" \
        -o jsonpath='{.spec.initContainers[*].name} {.spec.containers[*].name}' 2>/dev/null); do
      kubectl logs -n "$NS" "$pod" -c "$container" >"$DIAG_DIR/pods/$pod.$container.log" 2>&1
      kubectl logs -n "$NS" "$pod" -c "$container" --previous >"$DIAG_DIR/pods/$pod.$container.previous.log" 2>&1 \
        || rm -f "$DIAG_DIR/pods/$pod.$container.previous.log"
    done
  done
  kind export logs "$DIAG_DIR/kind" --name "$CLUSTER_NAME" >/dev/null 2>&1
  echo "--- last events"; tail -n 30 "$DIAG_DIR/events.txt"
  echo "--- pytorchjobs"; kubectl get pytorchjobs -A 2>&1
  echo "--- pods"; kubectl get pods -A -o wide 2>&1
}

on_exit() {
  local rc=$?
  set +e
  for pid in ${BG_PIDS[@]+"${BG_PIDS[@]}"}; do kill "$pid" 2>/dev/null; done
  if (( rc != 0 )); then
    say "FAILED with exit $rc"
    collect_diagnostics
  fi
  if (( CLUSTER_CREATED )); then
    if [[ "$KEEP_CLUSTER" == 1 ]]; then
      echo "KEEP_CLUSTER=1: cluster $CLUSTER_NAME left running (KUBECONFIG=$KUBECONFIG)"
    else
      run kind delete cluster --name "$CLUSTER_NAME"
    fi
  fi
  [[ "$KEEP_CLUSTER" == 1 ]] || rm -rf "$WORK_DIR"
  (( rc == 0 )) && say "E2E PASSED"
  exit "$rc"
}
trap on_exit EXIT

# ----------------------------------------------------------------------------- helpers

# wait_pod_done POD TIMEOUT_S: until the pod Succeeded (0) or Failed (1); prints its log.
wait_pod_done() {
  local pod=$1 deadline=$((SECONDS + $2)) phase=""
  while (( SECONDS < deadline )); do
    phase="$(kubectl get pod -n "$NS" "$pod" -o jsonpath='{.status.phase}' 2>/dev/null || true)"
    [[ "$phase" == Succeeded || "$phase" == Failed ]] && break
    sleep 2
  done
  kubectl logs -n "$NS" "$pod" || true
  [[ "$phase" == Succeeded ]] || fail "pod $pod ended as '${phase:-not finished}' (timeout $2 s)"
}

# pod_python NAME TIMEOUT_S CODE: run Python in a one-off pod of our image, against the emulator.
pod_python() {
  local name=$1 timeout=$2 code=$3
  run kubectl run "$name" -n "$NS" --image="$IMAGE" --image-pull-policy=IfNotPresent --restart=Never \
    "${EMULATOR_ENV[@]}" --command -- python -c "$code"
  wait_pod_done "$name" "$timeout"
}

# job_conditions: the PyTorchJob's true conditions, space separated.
job_conditions() {
  kubectl get pytorchjob -n "$NS" "$JOB" \
    -o jsonpath='{range .status.conditions[?(@.status=="True")]}{.type}{" "}{end}' 2>/dev/null || true
}

# scrape_metrics: in the background, read each job pod's /metrics through the API server's pod
# proxy (so the request crosses the cluster network to the pod IP) every 3 s until told to stop;
# keeps the latest scrape and the highest sam_train_step per pod. Stops at $WORK_DIR/stop-scraping.
scrape_metrics() {
  set +e
  local pod out step deadline=$((SECONDS + TIMEOUT_S + 120))
  while [[ ! -e "$WORK_DIR/stop-scraping" ]] && (( SECONDS < deadline )); do
    for pod in "$JOB-master-0" "$JOB-worker-0"; do
      out="$(kubectl get --raw "/api/v1/namespaces/$NS/pods/$pod:$METRICS_PORT/proxy/metrics" 2>/dev/null)" || continue
      step="$(awk '/^sam_train_step\{/ {print $NF; exit}' <<<"$out")"
      [[ -n "$step" ]] || continue
      printf '%s\n' "$out" >"$WORK_DIR/metrics-$pod.prom"
      if [[ ! -e "$WORK_DIR/max-step-$pod" ]] || awk -v a="$step" -v b="$(cat "$WORK_DIR/max-step-$pod")" \
          'BEGIN {exit !(a > b)}'; then
        echo "$step" >"$WORK_DIR/max-step-$pod"
      fi
    done
    sleep 3
  done
}

# wait_job: until the PyTorchJob is Succeeded (0); fails fast on Failed. Records pod placement.
wait_job() {
  local deadline=$((SECONDS + TIMEOUT_S)) conditions="" last="" placement
  while (( SECONDS < deadline )); do
    conditions="$(job_conditions)"
    conditions="${conditions% }"
    [[ "$conditions" != "$last" ]] && { echo "pytorchjob/$JOB conditions: ${conditions:-none} (${SECONDS}s)"; last="$conditions"; }
    placement="$(kubectl get pods -n "$NS" -l "training.kubeflow.org/job-name=$JOB" \
      -o jsonpath='{range .items[*]}{.metadata.name}={.spec.nodeName}{"\n"}{end}' 2>/dev/null || true)"
    [[ -n "$placement" ]] && printf '%s\n' "$placement" >"$WORK_DIR/placement.txt"
    case " $conditions " in
      *" Succeeded "*) return 0 ;;
      *" Failed "*) fail "pytorchjob/$JOB Failed: $(kubectl get pytorchjob -n "$NS" "$JOB" \
                          -o jsonpath='{.status.conditions[?(@.type=="Failed")].message}')" ;;
    esac
    sleep 5
  done
  fail "pytorchjob/$JOB not Succeeded after ${TIMEOUT_S}s (conditions: ${conditions:-none})"
}

# check_gpu_placement RELEASE PRESET: install the A100 check release with nodePool.preset=PRESET,
# assert its master pod is scheduled onto $GPU_NODE, uninstall. Only placement is asserted: the
# CPU image cannot use the fake GPU, so the trainer may fail afterwards.
check_gpu_placement() {
  local release=$1 preset=$2 node="" deadline=$((SECONDS + 180))
  retry 5 10 helm upgrade --install "$release" charts/sam-train -n "$NS" "${CHECK_VALUES[@]}" \
    --set nodePool.preset="$preset" --set fullnameOverride="$release"
  while (( SECONDS < deadline )); do
    node="$(kubectl get pod -n "$NS" "$release-master-0" -o jsonpath='{.spec.nodeName}' 2>/dev/null || true)"
    [[ -n "$node" ]] && break
    sleep 2
  done
  kubectl get pod -n "$NS" "$release-master-0" -o wide || true
  [[ -n "$node" ]] || { kubectl describe pod -n "$NS" "$release-master-0" || true;
                        fail "$release (nodePool.preset=$preset): master pod not scheduled within 180 s"; }
  [[ "$node" == "$GPU_NODE" ]] || fail "$release (nodePool.preset=$preset) landed on $node, not $GPU_NODE"
  echo "OK: $release (nodePool.preset=$preset) scheduled onto $node"
  run helm uninstall "$release" -n "$NS" --wait --timeout 120s
}

# ----------------------------------------------------------------------------- steps

say "0. tools and image build (background)"
[[ "$DEPLOY" == helm || "$DEPLOY" == kustomize ]] || fail "DEPLOY must be helm or kustomize, not '$DEPLOY'"
for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || fail "$tool is not on PATH"
done
run docker version --format 'docker {{.Server.Version}}'
run kind version
run helm version --short
mkdir -p "$DIAG_DIR"
if [[ "$SKIP_BUILD" == 1 ]]; then
  docker image inspect "$IMAGE" >/dev/null || fail "SKIP_BUILD=1 but image $IMAGE does not exist"
  BUILD_PID=""
else
  # The CPU variant of the Dockerfile (see its header); built while the cluster comes up.
  echo "+ docker build ... -t $IMAGE . (log: $DIAG_DIR/docker-build.log)"
  docker build --build-arg BASE_IMAGE=python:3.11-slim --build-arg TORCH_SPEC=torch==2.13.0 \
    --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
    --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
    -t "$IMAGE" . >"$DIAG_DIR/docker-build.log" 2>&1 &
  BUILD_PID=$!
  BG_PIDS+=("$BUILD_PID")
fi

say "1. kind cluster $CLUSTER_NAME (1 control plane + 2 workers, Kubernetes 1.31)"
if kind get clusters 2>/dev/null | grep -x "$CLUSTER_NAME" >/dev/null; then  # not -q: no SIGPIPE under pipefail
  run kind delete cluster --name "$CLUSTER_NAME"   # a leftover of an earlier KEEP_CLUSTER=1 run
fi
CLUSTER_CREATED=1
run kind create cluster --name "$CLUSTER_NAME" --config tests/e2e/kind-config.yaml --wait 180s
run kubectl wait --for=condition=Ready node --all --timeout=180s
run kubectl get nodes -o wide

say "2. $GPU_NODE dressed as an A100 80 GB node (before anything else is scheduled)"
run kubectl label node "$GPU_NODE" "${GPU_NODE_LABELS[@]}"
run kubectl taint node "$GPU_NODE" "$GPU_NODE_TAINT"
run kubectl patch node "$GPU_NODE" --subresource=status --type=json -p \
  "[{\"op\":\"add\",\"path\":\"/status/capacity/nvidia.com~1gpu\",\"value\":\"$FAKE_GPUS\"},
    {\"op\":\"add\",\"path\":\"/status/allocatable/nvidia.com~1gpu\",\"value\":\"$FAKE_GPUS\"}]"
for _ in $(seq 30); do
  gpus="$(kubectl get node "$GPU_NODE" -o jsonpath='{.status.allocatable.nvidia\.com/gpu}' || true)"
  [[ "$gpus" == "$FAKE_GPUS" ]] && break
  sleep 2
done
[[ "$gpus" == "$FAKE_GPUS" ]] || fail "$GPU_NODE allocatable nvidia.com/gpu is '$gpus', not $FAKE_GPUS"
echo "OK: $GPU_NODE allocatable nvidia.com/gpu=$gpus"

say "3. training-operator v1.9.4"
retry 3 15 kubectl apply --server-side -k "$OPERATOR_KUSTOMIZE"
run kubectl wait --for=condition=Established crd/pytorchjobs.kubeflow.org --timeout=120s
run kubectl rollout status -n kubeflow deployment/training-operator --timeout=300s

say "4. image $IMAGE into the cluster"
if [[ -n "$BUILD_PID" ]]; then
  if ! wait "$BUILD_PID"; then tail -n 60 "$DIAG_DIR/docker-build.log"; fail "docker build failed"; fi
  tail -n 5 "$DIAG_DIR/docker-build.log"
fi
run kind load docker-image "$IMAGE" --name "$CLUSTER_NAME"
run kubectl create namespace "$NS"

say "5. A100 presets schedule onto $GPU_NODE"
for check in "${A100_CHECKS[@]}"; do
  check_gpu_placement "${check%%:*}" "${check#*:}"
done

say "6. fake-gcs-server and synthetic shards in gs://$BUCKET/train"
run kubectl apply -n "$NS" -f tests/e2e/fake-gcs.yaml
run kubectl rollout status -n "$NS" deployment/fake-gcs --timeout=180s
pod_python synth-shards 300 "
import subprocess, sys, gcsfs
fs = gcsfs.GCSFileSystem(token='anon')
if not fs.exists('$BUCKET'):
    fs.mkdir('$BUCKET')
rc = subprocess.call(['sam-train', 'synth', '--out', 'gs://$BUCKET/train', '--images', '48', '--shards', '4'])
fs.invalidate_cache()
print('shards:', sorted(fs.glob('$BUCKET/train/sa_*.tar')))
sys.exit(rc or (0 if fs.glob('$BUCKET/train/sa_*.tar') else 1))
"

say "7. training job ($DEPLOY)"
case "$DEPLOY" in
  helm) retry 5 10 helm upgrade --install "$JOB" charts/sam-train -n "$NS" "${JOB_VALUES[@]}" ;;
  kustomize) retry 5 10 kubectl apply --server-side -k manifests/overlays/kind-cpu ;;
  *) fail "DEPLOY must be helm or kustomize, not '$DEPLOY'" ;;
esac
run kubectl get pytorchjob -n "$NS" "$JOB"

say "8. wait for pytorchjob/$JOB Succeeded (timeout ${TIMEOUT_S}s), scraping metrics"
scrape_metrics &
BG_PIDS+=("$!")
SCRAPER_PID=$!
wait_job
touch "$WORK_DIR/stop-scraping"
wait "$SCRAPER_PID" || true
run kubectl get pods -n "$NS" -o wide
kubectl logs -n "$NS" "$JOB-master-0" -c pytorch >"$WORK_DIR/master.log" 2>&1 || true
cp "$WORK_DIR/master.log" "$DIAG_DIR/master.log" || true

say "9. checks: checkpoint, metrics endpoint, placement"
pod_python check-checkpoint 300 "
import tomllib, gcsfs
from trainer.checkpoint import CheckpointManager
fs = gcsfs.GCSFileSystem(token='anon')
markers = sorted(fs.glob('$BUCKET/runs/e2e/checkpoints/step-*/COMPLETE'))
print('COMPLETE markers:', markers)
manager = CheckpointManager('$RUN_URL/checkpoints')
steps = manager.complete_steps()
assert markers and steps, 'no complete checkpoint under $RUN_URL/checkpoints'
manager.load(steps[0], verify=True)  # sizes and sha256 of every file against COMPLETE
config = tomllib.loads(fs.cat(manager.step_url(steps[0]) + '/config.toml').decode())
max_iters = config['optim']['max_iters']
assert steps[0] == max_iters, f'newest complete checkpoint is step {steps[0]}, not optim.max_iters={max_iters}'
assert fs.exists('$BUCKET/runs/e2e/metrics.jsonl'), 'no metrics.jsonl in the run dir'
print(f'OK: checkpoint step {steps[0]} (= optim.max_iters) complete and verified; metrics.jsonl present')
"
for pod in "$JOB-master-0" "$JOB-worker-0"; do
  [[ -s "$WORK_DIR/max-step-$pod" ]] || fail "no scrape of $pod:$METRICS_PORT/metrics showed sam_train_step"
  step="$(cat "$WORK_DIR/max-step-$pod")"
  awk -v s="$step" 'BEGIN {exit !(s >= 1)}' || fail "$pod's metrics never showed a finished step (max $step)"
  echo "OK: $pod:$METRICS_PORT/metrics answered through the pod proxy; highest sam_train_step seen: $step"
done
grep -q "training finished at step" "$WORK_DIR/master.log" \
  || fail "the master's log has no 'training finished at step' line"
echo "OK: $(grep -o 'training finished at step [0-9]*' "$WORK_DIR/master.log" | head -n 1)"
[[ -s "$WORK_DIR/placement.txt" ]] || fail "no placement of the job's pods was recorded"
cat "$WORK_DIR/placement.txt"
if grep -q "=$GPU_NODE\$" "$WORK_DIR/placement.txt"; then
  fail "a tiny-cpu pod ran on the tainted GPU node $GPU_NODE"
fi
echo "OK: no tiny-cpu pod on the tainted GPU node $GPU_NODE"
