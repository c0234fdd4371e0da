//go:build gpu

// Tensor parallelism on GPUs (build as gpu_test.go says). One test process
// per rank, each seeing one GPU (nntest.RunSplitRanks says what it checks):
//
//	go test -c -tags gpu -o bin/gpt-gpu.test ./plugins/gpt
//	export ORCH_GPU_MODEL=<gguf> ORCH_TP_SIZE=2 ORCH_TP_ADDR=127.0.0.1:29533 NCCL_NVLS_ENABLE=0
//	CUDA_VISIBLE_DEVICES=1 ORCH_TP_RANK=1 bin/gpt-gpu.test -test.run TestGPUTensorParallel -test.v > rank1.log 2>&1 &
//	CUDA_VISIBLE_DEVICES=0 ORCH_TP_RANK=0 ORCH_TP_OUT=tp.json bin/gpt-gpu.test -test.run TestGPUTensorParallel -test.v
//	wait
//
// Rank 0 compares the split run with the whole model on its GPU (logits
// within 2e-2 of max|logit|, greedy tokens identical) and writes both runs,
// with their one-stream decode speed, to ORCH_TP_OUT.

package gpt

import (
	"testing"

	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
)

func TestGPUTensorParallel(t *testing.T) { nntest.RunSplitRanks(t, NewLoader) }
