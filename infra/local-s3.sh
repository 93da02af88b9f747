#!/usr/bin/env bash
# A local S3-compatible server for development: moto's server mode (the one the tests use) on 127.0.0.1, with a
# bucket made, and the environment variables mdland's storage layer reads printed as `export` lines:
#   eval "$(infra/local-s3.sh 9000 mdland)"      # then use s3://mdland/... anywhere mdland takes a path
# The server runs in the background; what it is and how to stop it go to stderr, so they show under `eval` too.
# On failure it says why on stderr and prints `false`, so the `eval` fails as well. Needs the dev extra
# (moto[server]).
set -euo pipefail
port=${1:-9000}
bucket=${2:-mdland}
log=${TMPDIR:-/tmp}/mdland-s3-$port.log
fail() { echo "local-s3: $*" >&2; echo false; exit 1; }
answers() { python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/moto-api/', timeout=1)" 2>/dev/null; }

command -v moto_server >/dev/null || fail "moto_server is not installed (pip install 'moto[server]', or the dev extra)"
# A server already there would answer in place of ours, and we would report a pid that has exited.
if answers || python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), timeout=1)" 2>/dev/null; then
  fail "port $port is in use (another server, or an earlier local-s3.sh); pick another: infra/local-s3.sh PORT"
fi
moto_server -H 127.0.0.1 -p "$port" >"$log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  answers && break
  kill -0 "$pid" 2>/dev/null || fail "moto_server failed to start; see $log"
  sleep 0.2
done
answers || { kill "$pid"; fail "moto_server did not answer within 20 s; see $log"; }
export AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_ACCESS_KEY_ID=mdland AWS_SECRET_ACCESS_KEY=mdland AWS_REGION=us-east-1
python3 -c "import boto3; boto3.client('s3').create_bucket(Bucket='$bucket')" || { kill "$pid"; fail "could not make bucket $bucket"; }
echo "export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID=mdland AWS_SECRET_ACCESS_KEY=mdland AWS_REGION=us-east-1"
echo "local-s3: s3://$bucket is ready at $AWS_ENDPOINT_URL; the server is pid $pid: stop it with 'kill $pid'" >&2
