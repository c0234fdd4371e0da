// Package gguf reads and writes GGUF files (llama.cpp's model format,
// versions 2 and 3): metadata of every value type including nested arrays,
// tensor infos, alignment (general.alignment), and tensor data through a
// read-only memory mapping without copying.
//
// Why our own code and not github.com/gpustack/gguf-parser-go: that library
// is a read-only parser built for estimating memory use of remote and local
// models (HTTP range requests, Ollama registry, model-size estimators) and
// pulls those dependencies in; it has no writer, which orch needs for its
// synthetic models, and it does not hand out tensor data as slices of one
// mapping that the adapters can feed straight to a device copy. The format
// itself is small (a header, typed key/values, tensor infos, aligned data),
// so a reader with strict validation of hostile input (bounded allocations,
// overlap and bounds checks, typed ErrFormat errors) plus a streaming writer
// is a few hundred lines that we control and fuzz.
//
// Reading:
//
//	f, err := gguf.Open("model.gguf")
//	defer f.Close()
//	arch := f.Architecture()
//	n, _ := f.Uint(arch + ".block_count")
//	t, _ := f.Tensor("token_embd.weight")
//	b, _ := f.Data(t) // slice of the mapping
//
// Writing: NewWriter, Set for metadata, AddTensor with a fill function that
// streams exactly the tensor's bytes, then WriteFile or WriteTo.
//
// Shapes are in ggml "ne" order: Shape[0] is the contiguous dimension, so a
// 2-D weight of shape [in, out] is PyTorch's nn.Linear.weight [out, in].
package gguf
