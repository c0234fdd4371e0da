// Package tp runs one model split over several processes (tensor
// parallelism, docs/multi-gpu.md): one adapter process per rank, each with
// its shard of the weights and KV cache (ml.Shard). Rank 0 (the leader) runs
// the serving engine; every forward step it takes is broadcast to the other
// ranks (followers), which run the same step on their shard. The shards meet
// in all-reduces inside the forward pass (ml.Comm): device-side through
// NCCL on the GPU, through this package's TCP group on the CPU.
//
// The host starts the ranks and passes each its place in the group through
// sdk.LoadOptions.Extra (the keys below) and, on GPUs, CUDA_VISIBLE_DEVICES.
package tp

// LoadOptions.Extra keys the host sets on every rank of a split model.
const (
	// ExtraRank is this process's rank, 0 .. size-1 ("0" is the leader).
	ExtraRank = "tp.rank"
	// ExtraSize is the number of ranks (> 1).
	ExtraSize = "tp.size"
	// ExtraAddr is host:port where rank 0 listens for the other ranks
	// (loopback; chosen free by the host).
	ExtraAddr = "tp.addr"
)
