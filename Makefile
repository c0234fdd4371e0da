# orch — build, test and GPU targets. `make help` lists them.
GO        ?= go
BIN       := bin
VERSION   ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X github.com/llama-orch/orch/host/cli.Version=$(VERSION)
TESTFLAGS ?= -race -timeout 15m

.PHONY: all build serve test lint fmt vet cuda cuda-check cuda-host-test proto-check gpu-bins gpu-pack gpu-check clean help

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
	$(GO) vet -tags hftokenizers ./sdk/tokenizer/hfrust/ # optional Rust tokenizers backend: type-checked, never linked here

cuda: ## build cuda/ into build/cuda/liborch_cuda.so (needs nvcc and cmake)
	cmake -S cuda -B build/cuda $$(command -v ninja >/dev/null && echo -G Ninja) -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cuda

cuda-check: ## compile every .cu for sm_80/sm_90 (Debian's nvcc 11.8) and sm_90a (CUDA 12.4, cuda/scripts/nvcc12.sh), run the host tests
	bash .ci/cuda-check.sh

proto-check: ## regenerate the adapter protocol with buf and fail on a diff
	$(GO) install github.com/bufbuild/buf/cmd/buf@v1.75.0
	$(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
	$(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.0
	bash .ci/proto-check.sh

gpu-bins: build ## build the GPU test binaries (run on a GPU machine with cuda/scripts/gpu-check.sh)
	$(GO) test -c -tags gpu -o $(BIN)/cuda-gpu.test ./sdk/ml/cuda
	$(GO) test -c -tags gpu -o $(BIN)/gpt-gpu.test ./plugins/gpt
	$(GO) test -c -tags gpu -o $(BIN)/llama-gpu.test ./plugins/llama

gpu-pack: ## pack stripped binaries for cuda/scripts/e2e-gpu.sh into .gpu/bins.tar.xz (carry ".gpu"; < 64 MiB with the tree)
	mkdir -p .gpu/pack && rm -f .gpu/pack/*
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '-s -w $(LDFLAGS)' -o .gpu/pack/orch-host ./host/cmd/orch-host
	$(GO) build -trimpath -ldflags '-s -w $(LDFLAGS)' -o .gpu/pack/orch-adapter-gpt ./plugins/gpt/cmd/orch-adapter-gpt
	$(GO) build -trimpath -ldflags '-s -w $(LDFLAGS)' -o .gpu/pack/orch-adapter-llama ./plugins/llama/cmd/orch-adapter-llama
	$(GO) test -c -tags gpu -trimpath -ldflags '-s -w' -o .gpu/pack/gpt-gpu.test ./plugins/gpt
	$(GO) test -c -tags gpu -trimpath -ldflags '-s -w' -o .gpu/pack/cuda-gpu.test ./sdk/ml/cuda
	$(GO) test -c -tags gpu -trimpath -ldflags '-s -w' -o .gpu/pack/llama-gpu.test ./plugins/llama
	tar -C .gpu/pack -cJf .gpu/bins.tar.xz .
	rm -rf .gpu/cuda .gpu/pack/ && cp -r cuda .gpu/cuda
	@ls -la .gpu/bins.tar.xz

cuda-host-test: ## host tests of the CUDA kernels (CPU emulation, no GPU)
	bash cuda/test/run.sh

gpu-check: gpu-bins ## on a GPU machine: build liborch_cuda.so, run the GPU suite and memcheck
	bash cuda/scripts/gpu-check.sh

clean:
	rm -rf $(BIN) build

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'
