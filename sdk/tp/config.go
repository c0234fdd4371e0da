package tp

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/llama-orch/orch/sdk"
)

// Config is one rank's place in a tensor-parallel group.
type Config struct {
	Rank int    // 0 .. Size-1; 0 is the leader (it listens on Addr)
	Size int    // number of ranks, >= 2
	Addr string // host:port rank 0 listens on and the others dial
	// Timeout, when > 0, bounds how long a rank waits inside AllReduceF32
	// and Barrier for the other ranks (and how long a frame write may take).
	// 0 waits as long as the peers' connections stay open: a peer process
	// that dies closes its sockets, so that is still no hang; only a stopped
	// (SIGSTOP) peer would block. A follower waiting for the leader's next
	// step (Broadcast) never times out: the leader may be idle.
	Timeout time.Duration
}

// Validate checks the fields (sdk.ErrInvalidArgument).
func (c Config) Validate() error {
	if c.Size < 2 {
		return fmt.Errorf("tp: group size %d: a split model needs at least 2 ranks: %w", c.Size, sdk.ErrInvalidArgument)
	}
	if c.Size > maxRanks {
		return fmt.Errorf("tp: group size %d exceeds %d ranks: %w", c.Size, maxRanks, sdk.ErrInvalidArgument)
	}
	if c.Rank < 0 || c.Rank >= c.Size {
		return fmt.Errorf("tp: rank %d out of range [0, %d): %w", c.Rank, c.Size, sdk.ErrInvalidArgument)
	}
	if strings.TrimSpace(c.Addr) == "" {
		return fmt.Errorf("tp: empty group address (%s): %w", ExtraAddr, sdk.ErrInvalidArgument)
	}
	if c.Timeout < 0 {
		return fmt.Errorf("tp: negative timeout %v: %w", c.Timeout, sdk.ErrInvalidArgument)
	}
	return nil
}

// maxRanks bounds the group size (a sanity limit, far above any host's GPUs).
const maxRanks = 1024

// ParseExtra reads the tensor-parallel keys (ExtraRank, ExtraSize,
// ExtraAddr) from sdk.LoadOptions.Extra. ok is false (and err nil) when none
// of them is set: the model is not split. Setting only some of them, or
// values that do not parse or are out of range, is an error wrapping
// sdk.ErrInvalidArgument.
func ParseExtra(extra map[string]string) (cfg Config, ok bool, err error) {
	rs, hasRank := extra[ExtraRank]
	ss, hasSize := extra[ExtraSize]
	addr, hasAddr := extra[ExtraAddr]
	if !hasRank && !hasSize && !hasAddr {
		return Config{}, false, nil
	}
	var missing []string
	for _, k := range []struct {
		name string
		set  bool
	}{{ExtraRank, hasRank}, {ExtraSize, hasSize}, {ExtraAddr, hasAddr}} {
		if !k.set {
			missing = append(missing, k.name)
		}
	}
	if len(missing) > 0 {
		return Config{}, false, fmt.Errorf("tp: extra options set only partly, missing %s: %w",
			strings.Join(missing, ", "), sdk.ErrInvalidArgument)
	}
	rank, err := strconv.Atoi(strings.TrimSpace(rs))
	if err != nil {
		return Config{}, false, fmt.Errorf("tp: %s=%q is not an integer: %w", ExtraRank, rs, sdk.ErrInvalidArgument)
	}
	size, err := strconv.Atoi(strings.TrimSpace(ss))
	if err != nil {
		return Config{}, false, fmt.Errorf("tp: %s=%q is not an integer: %w", ExtraSize, ss, sdk.ErrInvalidArgument)
	}
	cfg = Config{Rank: rank, Size: size, Addr: strings.TrimSpace(addr)}
	if err := cfg.Validate(); err != nil {
		return Config{}, false, err
	}
	return cfg, true, nil
}
