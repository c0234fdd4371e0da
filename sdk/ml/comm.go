package ml

// Comm is one rank's handle on a tensor-parallel group: the collective
// operation model code calls between its shards (docs/multi-gpu.md).
type Comm interface {
	// Rank is this member's index in the group (0 = leader); Size the
	// number of members.
	Rank() int
	Size() int
	// AllReduce replaces t (F32, on b) with the element-wise sum of t over
	// all ranks. Like an op it may be asynchronous (enqueued on b's stream);
	// a failure is kept and reported by Err (and by b's Sync where the
	// collective runs on the device).
	AllReduce(b Backend, t Tensor)
	// Graphable reports whether AllReduce may be recorded in a graph
	// (GraphBackend.Run): true for device-side collectives, false when the
	// reduction goes through the host.
	Graphable() bool
	// Err returns the first collective error (sticky), nil if none.
	Err() error
	// Close leaves the group and frees its resources.
	Close() error
}

// Shard places one model instance in a tensor-parallel group: Rank of Size
// members, each holding its part of every split weight and of the KV cache
// (attention heads and feed-forward columns split Size ways). Size <= 1
// means the whole model (Comm may then be nil).
type Shard struct {
	Rank, Size int
	Comm       Comm
}

// Split reports whether s splits the model (Size > 1).
func (s Shard) Split() bool { return s.Size > 1 }

// CollectiveBackend is implemented by backends with device-side collectives
// (the CUDA backend through NCCL, when libnccl is found). Bootstrap: rank 0
// calls CommID and hands the bytes to every rank out of band (sdk/tp does it
// over its TCP group); every rank then calls NewComm with them, concurrently.
type CollectiveBackend interface {
	Backend
	// CommID creates the group's bootstrap id (on rank 0 only).
	CommID() ([]byte, error)
	// NewComm joins the group as rank of size; it returns once every rank
	// joined (or fails).
	NewComm(id []byte, rank, size int) (Comm, error)
}
