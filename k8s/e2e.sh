#!/usr/bin/env bash
# End-to-end on kind, for a machine with Docker: create the cluster (kind-config.yaml), build and load
# the image, install ingress-nginx and kube-prometheus-stack at pinned versions, install the chart with
# chart/ci/kind-values.yaml (ingress on), `helm test`, then run the Locust Job (k8s/locust-job.yaml)
# while `kubectl rollout restart` replaces every gateway pod. Fails unless the Job succeeded with zero
# Locust failures, zero truncated streams and zero errors (k8s/watch_rollout.py reads its log).
#
#   bash k8s/e2e.sh                  # KEEP_CLUSTER=1 keeps a cluster this run created; one it found is kept
#
# Needs: docker, kind, kubectl >= 1.31 (`wait --for=create`), helm, and a Python with the `kubernetes`
# package (pip install -e '.[cluster]').
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER="${CLUSTER:-streaming-gateway}"
NAMESPACE="${NAMESPACE:-streaming}"
RELEASE="${RELEASE:-gw}"
IMAGE="streaming-gateway:e2e"  # chart/ci/kind-values.yaml: repository streaming-gateway, tag e2e
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
RAMP_SECONDS="${RAMP_SECONDS:-45}"  # streams in flight before the restart begins
KEEP_CLUSTER="${KEEP_CLUSTER:-0}"

INGRESS_NGINX_VERSION="4.14.3"
KUBE_PROMETHEUS_STACK_VERSION="88.0.1"
GATEWAY_API_VERSION="v1.4.0"
GATEWAY_API_CRDS="https://github.com/kubernetes-sigs/gateway-api/releases/download/${GATEWAY_API_VERSION}/standard-install.yaml"

log() { printf '\n== %s\n' "$*"; }

for tool in docker kind kubectl helm "$PYTHON"; do
  command -v "$tool" >/dev/null || { echo "e2e: $tool is required" >&2; exit 2; }
done
"$PYTHON" -c 'import kubernetes' || { echo "e2e: $PYTHON lacks the kubernetes package" >&2; exit 2; }

created_cluster=0
cleanup() {
  # only a cluster this run created: one that was already there is someone's, and stays
  if [ "$created_cluster" = 1 ] && [ "$KEEP_CLUSTER" != 1 ]; then
    kind delete cluster --name "$CLUSTER"
  fi
}
trap cleanup EXIT

log "kind cluster $CLUSTER"
if kind get clusters | grep -qx "$CLUSTER"; then
  log "reusing the existing cluster $CLUSTER (it is not deleted afterwards)"
else
  created_cluster=1
  kind create cluster --name "$CLUSTER" --config kind-config.yaml --wait 180s
fi
kubectl config use-context "kind-$CLUSTER"

log "image $IMAGE"
docker build --tag "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

log "Gateway API CRDs $GATEWAY_API_VERSION"
kubectl apply --server-side --filename "$GATEWAY_API_CRDS"

log "ingress-nginx $INGRESS_NGINX_VERSION"
helm upgrade --install ingress-nginx ingress-nginx \
  --repo https://kubernetes.github.io/ingress-nginx --version "$INGRESS_NGINX_VERSION" \
  --namespace ingress-nginx --create-namespace --values k8s/ingress-nginx-values.yaml --wait --timeout 5m

log "kube-prometheus-stack $KUBE_PROMETHEUS_STACK_VERSION"
helm upgrade --install kube-prometheus-stack kube-prometheus-stack \
  --repo https://prometheus-community.github.io/helm-charts --version "$KUBE_PROMETHEUS_STACK_VERSION" \
  --namespace monitoring --create-namespace --values k8s/kube-prometheus-stack-values.yaml --wait --timeout 10m

log "streaming-gateway"
helm upgrade --install "$RELEASE" chart --namespace "$NAMESPACE" --create-namespace \
  --values chart/ci/kind-values.yaml --wait --timeout 5m
helm test "$RELEASE" --namespace "$NAMESPACE" --logs

log "Locust job"
kubectl --namespace "$NAMESPACE" delete job locust --ignore-not-found --wait
kubectl --namespace "$NAMESPACE" create configmap locustfile --dry-run=client --output yaml \
  --from-file=loadtest/locustfile.py --from-file=loadtest/stream_check.py --from-file=loadtest/shapes.py \
  | kubectl apply --filename -
kubectl --namespace "$NAMESPACE" apply --filename k8s/locust-job.yaml
"$PYTHON" k8s/watch_rollout.py --namespace "$NAMESPACE" --release "$RELEASE" --job locust &
watcher=$!
# the Job controller creates the pod a moment after the Job: waiting on a condition before it exists fails
# at once ("no matching resources found"), and `set -e` would end the script
kubectl --namespace "$NAMESPACE" wait pod --selector job-name=locust --for=create --timeout 120s
kubectl --namespace "$NAMESPACE" wait pod --selector job-name=locust --for=condition=Ready --timeout 180s
sleep "$RAMP_SECONDS"

log "rollout restart under load"
deployment="deployment/$RELEASE-streaming-gateway"
kubectl --namespace "$NAMESPACE" rollout restart "$deployment"
kubectl --namespace "$NAMESPACE" rollout status "$deployment" --timeout 10m

log "waiting for the Locust job and judging it"
if wait "$watcher"; then
  log "PASS: no stream failed or was cut during the rollout"
else
  log "FAIL"
  kubectl --namespace "$NAMESPACE" logs job/locust --tail 60 || true
  exit 1
fi
