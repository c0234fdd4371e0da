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
//
// # Use (in a model loader)
//
//	cfg, split, err := tp.ParseExtra(req.Options.Extra)
//	g, err := tp.Join(ctx, cfg)         // rendezvous of all ranks
//	comm, err := tp.NewComm(g, backend) // NCCL on CUDA, host all-reduce on CPU
//	... build the shard with ml.Shard{Rank: cfg.Rank, Size: cfg.Size, Comm: comm}
//	if cfg.Rank == 0 {
//		model = tp.Lead(model, g)       // the engine drives it; steps are broadcast
//	} else {
//		model = tp.Follow(model, g, done) // runs rank 0's steps until Close
//	}
//
// # The group
//
// Group is a hand-written TCP transport: a star of connections around rank
// 0 with length-prefixed frames, a handshake (group size, unique ranks) and
// three collectives (Broadcast, AllReduceF32, Barrier). Why not a library:
// NCCL is device-only (and absent from CI machines and CPU runs), and Go has
// no MPI or Gloo binding that needs no cgo; what is needed here is small.
// The step descriptors travel as host bytes either way (a few KB per step),
// so even a GPU group uses this transport for them, and only the
// activations' all-reduce moves to NCCL. The host all-reduce (NewComm on a
// backend without device collectives, or ORCH_TP_COMM=host) serves CPU runs
// and tests: it sums on rank 0 in rank order and sends the sum back, so every
// rank gets bit-identical values.
//
// Failure: a rank that dies closes its sockets; a rank whose step fails sends
// an abort notice with its reason and closes them. Either way every rank's
// pending and later calls fail (ErrBroken) instead of waiting: the ranks of
// a group cannot continue without one of theirs, and the host restarts the
// group as a unit. Config.Timeout optionally bounds the waits inside
// collectives (a stopped but not dead peer).
//
// # Leader and follower
//
// Lead wraps rank 0's engine.Model: each call the engine makes is encoded as
// a step message (op and engine.Batch, plus the SampleSpecs of a
// ForwardSample step; a compact varint encoding), broadcast, then run
// locally. Follow runs the same calls on a follower's model as they arrive.
// Every rank thus runs the same forward passes in the same order and meets
// the others in the model's all-reduces. The lm head is replicated, so a
// ForwardGreedy or ForwardSample step picks tokens on every rank; only rank
// 0's tokens are used, and only rank 0 runs the host sampler.
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
