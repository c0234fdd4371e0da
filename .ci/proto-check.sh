#!/usr/bin/env bash
# Regenerates the adapter wire protocol (sdk/proto -> sdk/internal/adapterv1)
# with buf and local plugins, and fails if the committed code differs.
# Tools (offline through the Go module proxy):
#   go install github.com/bufbuild/buf/cmd/buf@v1.75.0 \
#     google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12 \
#     google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.0
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$(go env GOPATH)/bin:$PATH"
for tool in buf protoc-gen-go protoc-gen-go-grpc; do
	if ! command -v "$tool" >/dev/null; then
		echo "proto-check: $tool not found; install it with the go install line in $0" >&2
		exit 2
	fi
done
want_go="protoc-gen-go v1.36.12"
have_go=$(protoc-gen-go --version)
if [ "$have_go" != "$want_go" ]; then
	echo "proto-check: need $want_go, have $have_go" >&2
	exit 2
fi
want_grpc="protoc-gen-go-grpc 1.6.0"
have_grpc=$(protoc-gen-go-grpc --version)
if [ "$have_grpc" != "$want_grpc" ]; then
	echo "proto-check: need $want_grpc, have $have_grpc" >&2
	exit 2
fi
out=sdk/internal/adapterv1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r "$root/$out" "$tmp/before"
(cd "$root/sdk/proto" && buf lint && buf generate)
if ! diff -ru "$tmp/before" "$root/$out"; then
	echo "proto-check: generated code in $out is out of date; run (cd sdk/proto && buf generate) and commit" >&2
	exit 1
fi
echo "proto-check: $out is up to date"
