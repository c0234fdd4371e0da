package tokenizer

// pairTable maps a pair of token ids to its merge. It is an open-addressing
// hash table (linear probing, power-of-two size, at most half full) rather
// than a Go map because merge lookups are the encoder's hot loop and this is
// about twice as fast.
type pairTable struct {
	keys []uint64 // 0 = empty; stored keys are pairKey+1 ... see slot
	vals []merge
	mask uint64
}

func newPairTable(n int) *pairTable {
	size := 16
	for size < 2*n {
		size <<= 1
	}
	return &pairTable{keys: make([]uint64, size), vals: make([]merge, size), mask: uint64(size - 1)}
}

func hashPair(k uint64) uint64 {
	k ^= k >> 33
	k *= 0xff51afd7ed558ccd
	k ^= k >> 33
	return k
}

// Keys are stored +1 so that zero marks an empty slot (ids are < 2^31, so
// pairKey never overflows).
func (t *pairTable) get(k uint64) (merge, bool) {
	k++
	for i := hashPair(k) & t.mask; ; i = (i + 1) & t.mask {
		switch t.keys[i] {
		case k:
			return t.vals[i], true
		case 0:
			return merge{}, false
		}
	}
}

// put stores v for k unless k is present with a lower rank.
func (t *pairTable) put(k uint64, v merge) {
	k++
	for i := hashPair(k) & t.mask; ; i = (i + 1) & t.mask {
		switch t.keys[i] {
		case k:
			if v.rank < t.vals[i].rank {
				t.vals[i] = v
			}
			return
		case 0:
			t.keys[i] = k
			t.vals[i] = v
			return
		}
	}
}
