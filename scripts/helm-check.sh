#!/usr/bin/env bash
# The quick Helm check (make helm-check): lint the three charts and render every values file the
# tests use, with the real helm from .tools/. test/helm/ then validates each rendered object.
# Nothing is written into the repository: the charts are copied to a temporary folder first, so
# `helm dependency build` of the example runs there.
set -euo pipefail
cd "$(dirname "$0")/.."
helm="$PWD/.tools/helm"
values="$PWD/test/helm/values"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export HELM_CACHE_HOME="$tmp/home/cache" HELM_CONFIG_HOME="$tmp/home/config" HELM_DATA_HOME="$tmp/home/data"
cp -r deploy/helm "$tmp/helm"
chart="$tmp/helm/token-broker"
example="$tmp/helm/examples/module-app"

"$helm" dependency build "$example" >/dev/null
"$helm" lint --strict --quiet "$chart" -f "$values/minimal.yaml"
"$helm" lint --strict --quiet "$tmp/helm/token-broker-sidecar" "$example"

render() {
  "$helm" template token-broker "$@" --namespace token-broker >/dev/null
}
render "$chart" -f "$values/minimal.yaml"
render "$chart" -f "$values/minimal.yaml" -f "$values/external-redis.yaml"
render "$chart" -f "$values/minimal.yaml" -f "$values/external-sentinel.yaml"
render "$chart" -f "$values/minimal.yaml" -f "$values/external-cluster.yaml"
render "$chart" -f "$values/minimal.yaml" -f "$values/hpa-servicemonitor.yaml"
render "$chart" -f "$values/minimal.yaml" --set metrics.enabled=true,metrics.prometheusRule.enabled=true
render "$chart" -f "$values/folio.yaml"
render "$chart" -f "$values/idps.yaml"
render "$chart" -f "$values/minimal.yaml" -f "$values/tls-cert-manager.yaml"
render "$chart" -f "$values/minimal.yaml" -f "$values/tls-existing-secret.yaml"
render "$chart" -f "$values/minimal.yaml" -f "$values/auth-policy.yaml"
render "$chart" -f "$values/minimal.yaml" -f "$values/auth-jwks.yaml"
render "$chart" -f "$values/minimal.yaml" -f "$values/insecure.yaml"
render "$chart" -f "$values/minimal.yaml" -f "$values/webhook.yaml"
render "$chart" -f "$values/minimal.yaml" -f "$values/webhook-cert-manager.yaml"
render "$example"
render "$example" -f "$values/module-container-sidecar.yaml"
render "$example" -f "$values/module-tls-options.yaml"
render "$example" -f "$values/module-plaintext.yaml"

# Bad values must be refused (by values.schema.json, or a template's check where noted).
refused=0
for bad in "$values"/invalid-*.yaml "$values"/missing-*.yaml; do
  case "$(basename "$bad")" in
    missing-*) args=(-f "$bad") ;;
    *) args=(-f "$values/minimal.yaml" -f "$bad") ;;
  esac
  if render "$chart" "${args[@]}" 2>/dev/null; then
    echo "error: helm accepted $(basename "$bad"), which the chart must refuse" >&2
    exit 1
  fi
  refused=$((refused + 1))
done
echo "helm-check: 3 charts lint clean, 19 value sets render, $refused bad ones are refused"
