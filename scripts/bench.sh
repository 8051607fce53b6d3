#!/usr/bin/env bash
# Runs the benchmarks in bench/ (every bench/*.ts; bench/lib holds their shared parts), or the one
# named by its first argument (`make bench BENCH=rotation` runs bench/rotation.ts). Each starts its
# own processes on 127.0.0.1, runs bounded, stops by itself and prints figures beside a same-run
# baseline; none passes or fails on a figure.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -gt 0 && -n "$1" ]]; then
  file="bench/$1.ts"
  if [[ ! -f "$file" ]]; then
    echo "error: no benchmark '$1' (bench/$1.ts); there are: $(cd bench && ls *.ts | sed 's/\.ts$//' | tr '\n' ' ')" >&2
    exit 2
  fi
  files=("$file")
else
  files=(bench/*.ts)
fi
start=$(date +%s)
for file in "${files[@]}"; do
  echo "=== ${file} ($(date -u +%H:%M:%S))"
  node --import tsx "$file"
done
echo "=== ${#files[@]} benchmark(s) in $(($(date +%s) - start)) s"
