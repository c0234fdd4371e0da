# orch — build, test and GPU targets. `make help` lists them.
GO        ?= go
BIN       := bin
VERSION   ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X github.com/llama-orch/orch/host/cli.Version=$(VERSION)
TESTFLAGS ?= -race -timeout 15m

.PHONY: all build serve test lint fmt vet cuda cuda-check gpu-check clean help

all: build

build: ## build orch-host and the adapters into bin/
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/orch-host ./host/cmd/orch-host
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/orch-adapter-gpt ./plugins/gpt/cmd/orch-adapter-gpt
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/orch-adapter-llama ./plugins/llama/cmd/orch-adapter-llama

serve: build ## build, then serve the embedded default model (or ARGS="--model F.gguf")
	$(BIN)/orch-host serve $(ARGS)

test: build ## run every Go test with -race
	$(GO) test $(TESTFLAGS) ./...

lint: fmt vet ## gofmt and go vet must be clean

fmt:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...

cuda: ## build cuda/ into build/cuda/liborch_cuda.so (needs nvcc)
	cmake -S cuda -B build/cuda -G Ninja -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cuda

clean:
	rm -rf $(BIN) build

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'
