package tokenizer

// pairTable maps a pair of token ids to its merge. It is an open-addressing
// hash table (linear probing, power-of-two size, at most half full, key and
// value side by side so that a probe touches one cache line) rather than a
// Go map because merge lookups are the encoder's hot loop; lookups are about
// five times faster than map[uint64]merge at o200k's size.
type pairTable struct {
	slots []pairSlot
	mask  uint64
}

type pairSlot struct {
	key uint64 // pairKey+1; 0 marks an empty slot (ids are < 2^31, no overflow)
	val merge
}

func newPairTable(n int) *pairTable {
	size := 16
	for size < 2*n {
		size <<= 1
	}
	return &pairTable{slots: make([]pairSlot, size), mask: uint64(size - 1)}
}

func hashPair(k uint64) uint64 {
	k ^= k >> 33
	k *= 0xff51afd7ed558ccd
	k ^= k >> 33
	return k
}

func (t *pairTable) get(k uint64) (merge, bool) {
	k++
	for i := hashPair(k) & t.mask; ; i = (i + 1) & t.mask {
		s := &t.slots[i]
		if s.key == k {
			return s.val, true
		}
		if s.key == 0 {
			return merge{}, false
		}
	}
}

// put stores v for k unless k is present with a lower rank.
func (t *pairTable) put(k uint64, v merge) {
	k++
	for i := hashPair(k) & t.mask; ; i = (i + 1) & t.mask {
		s := &t.slots[i]
		if s.key == k {
			if v.rank < s.val.rank {
				s.val = v
			}
			return
		}
		if s.key == 0 {
			s.key, s.val = k, v
			return
		}
	}
}
