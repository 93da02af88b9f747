#!/usr/bin/env bash
# A local S3-compatible server for development: moto's server mode (the one the tests use) on 127.0.0.1, with a
# bucket made, and the environment variables mdland's storage layer reads printed as `export` lines:
#   eval "$(infra/local-s3.sh 9000 mdland)"      # then use s3://mdland/... anywhere mdland takes a path
# The server runs in the background; the last line says how to stop it. Needs the dev extra (moto[server]).
set -euo pipefail
port=${1:-9000}
bucket=${2:-mdland}
log=${TMPDIR:-/tmp}/mdland-s3-$port.log
moto_server -H 127.0.0.1 -p "$port" >"$log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/moto-api/', timeout=1)" 2>/dev/null; then
    break
  fi
  kill -0 "$pid" 2>/dev/null || { echo "moto_server failed to start; see $log" >&2; exit 1; }
  sleep 0.2
done
export AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_ACCESS_KEY_ID=mdland AWS_SECRET_ACCESS_KEY=mdland AWS_REGION=us-east-1
python3 -c "import boto3; boto3.client('s3').create_bucket(Bucket='$bucket')"
echo "export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID=mdland AWS_SECRET_ACCESS_KEY=mdland AWS_REGION=us-east-1"
echo "# s3://$bucket is ready; the server is pid $pid: stop it with 'kill $pid'"
