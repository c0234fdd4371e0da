package tp

import (
	"context"
	"errors"
	"math"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// newGroups joins size ranks in this process over loopback (rank 0 on a
// free port) and closes them at the end of the test.
func newGroups(t *testing.T, size int, timeout time.Duration) []*Group {
	t.Helper()
	l, err := Listen(Config{Rank: 0, Size: size, Addr: "127.0.0.1:0", Timeout: timeout})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	gs := make([]*Group, size)
	errs := make([]error, size)
	var wg sync.WaitGroup
	for r := 1; r < size; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			gs[r], errs[r] = Join(ctx, Config{Rank: r, Size: size, Addr: l.Addr(), Timeout: timeout})
		}()
	}
	gs[0], errs[0] = l.Accept(ctx)
	wg.Wait()
	for r, err := range errs {
		require.NoError(t, err, "rank %d", r)
	}
	t.Cleanup(func() {
		for _, g := range gs {
			_ = g.Close()
		}
	})
	return gs
}

// onAll runs f on every rank concurrently and returns the errors by rank.
func onAll(gs []*Group, f func(g *Group) error) []error {
	errs := make([]error, len(gs))
	var wg sync.WaitGroup
	for r, g := range gs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[r] = f(g)
		}()
	}
	wg.Wait()
	return errs
}

func TestJoinAndCollectives(t *testing.T) {
	for _, size := range []int{2, 3} {
		t.Run(map[int]string{2: "2 ranks", 3: "3 ranks"}[size], func(t *testing.T) {
			gs := newGroups(t, size, 0)
			for r, g := range gs {
				assert.Equal(t, r, g.Rank())
				assert.Equal(t, size, g.Size())
				assert.NoError(t, g.Err())
			}

			// Broadcast: rank 0's bytes everywhere, several in a row,
			// including an empty message.
			for _, msg := range [][]byte{[]byte("step one"), {}, make([]byte, 300_000)} {
				got := make([][]byte, size)
				errs := onAll(gs, func(g *Group) error {
					var in []byte
					if g.Rank() == 0 {
						in = msg
					} else {
						in = []byte("ignored")
					}
					out, err := g.Broadcast(in)
					got[g.Rank()] = out
					return err
				})
				for r := range gs {
					require.NoError(t, errs[r])
					assert.Equal(t, len(msg), len(got[r]), "rank %d", r)
					assert.Equal(t, string(msg), string(got[r]), "rank %d", r)
				}
			}

			// AllReduce: random floats; every rank gets the same bits,
			// equal to the rank-order sum.
			rng := rand.New(rand.NewPCG(1, uint64(size)))
			for _, n := range []int{0, 1, 2880, 100_003} {
				in := make([][]float32, size)
				for r := range in {
					in[r] = make([]float32, n)
					for i := range in[r] {
						in[r][i] = float32(rng.NormFloat64() * math.Pow(10, float64(rng.IntN(7)-3)))
					}
				}
				want := make([]float32, n)
				for i := range want {
					s := in[0][i]
					for r := 1; r < size; r++ {
						s += in[r][i]
					}
					want[i] = s
				}
				got := make([][]float32, size)
				for r := range got {
					got[r] = append([]float32(nil), in[r]...)
				}
				errs := onAll(gs, func(g *Group) error { return g.AllReduceF32(got[g.Rank()]) })
				for r := range gs {
					require.NoError(t, errs[r])
					for i := range want {
						if math.Float32bits(got[r][i]) != math.Float32bits(want[i]) {
							t.Fatalf("n=%d rank %d [%d]: %v, want %v", n, r, i, got[r][i], want[i])
						}
					}
				}
			}

			// Barrier: nobody leaves before the last one arrives.
			var mu sync.Mutex
			arrived := 0
			errs := onAll(gs, func(g *Group) error {
				if g.Rank() == size-1 {
					time.Sleep(50 * time.Millisecond)
				}
				mu.Lock()
				arrived++
				mu.Unlock()
				if err := g.Barrier(); err != nil {
					return err
				}
				mu.Lock()
				defer mu.Unlock()
				if arrived != size {
					return errors.New("left the barrier early")
				}
				return nil
			})
			for r := range gs {
				assert.NoError(t, errs[r], "rank %d", r)
			}
		})
	}
}

// A rank closing its group while the others are inside a collective gives
// every other rank an error, promptly.
func TestPeerClosesMidCall(t *testing.T) {
	for _, quitter := range []int{0, 1, 2} {
		t.Run("rank "+string(rune('0'+quitter)), func(t *testing.T) {
			gs := newGroups(t, 3, 0)
			start := time.Now()
			errs := onAll(gs, func(g *Group) error {
				if g.Rank() == quitter {
					time.Sleep(30 * time.Millisecond)
					return g.Close()
				}
				return g.AllReduceF32(make([]float32, 10))
			})
			assert.Less(t, time.Since(start), 5*time.Second)
			for r, err := range errs {
				if r == quitter {
					continue
				}
				require.Error(t, err, "rank %d", r)
				assert.ErrorIs(t, err, ErrBroken, "rank %d", r)
				assert.Error(t, gs[r].Err())
				// Every later call fails too, without waiting.
				_, err = gs[r].Broadcast([]byte("x"))
				assert.ErrorIs(t, err, ErrBroken)
				assert.ErrorIs(t, gs[r].Barrier(), ErrBroken)
				select {
				case <-gs[r].Done():
				default:
					t.Errorf("rank %d: Done not closed", r)
				}
			}
		})
	}
}

// A follower waiting for a broadcast sees the leader vanish.
func TestFollowerSeesLeaderClose(t *testing.T) {
	gs := newGroups(t, 2, 0)
	errc := make(chan error, 1)
	go func() {
		_, err := gs[1].Broadcast(nil)
		errc <- err
	}()
	time.Sleep(20 * time.Millisecond)
	require.NoError(t, gs[0].Close())
	select {
	case err := <-errc:
		assert.ErrorIs(t, err, ErrBroken)
		assert.Contains(t, err.Error(), "connection to rank 0 lost")
	case <-time.After(5 * time.Second):
		t.Fatal("follower still waiting after the leader closed")
	}
}

// Abort's reason reaches every rank (relayed through rank 0).
func TestAbortReasonReachesEveryRank(t *testing.T) {
	gs := newGroups(t, 3, 0)
	errs := onAll(gs, func(g *Group) error {
		if g.Rank() == 2 {
			g.Abort(errors.New("out of device memory"))
			return nil
		}
		return g.Barrier()
	})
	for r := 0; r < 2; r++ {
		require.Error(t, errs[r])
		assert.ErrorIs(t, errs[r], ErrBroken)
		assert.Contains(t, errs[r].Error(), "rank 2: out of device memory", "rank %d", r)
	}
}

func TestCollectiveTimeout(t *testing.T) {
	gs := newGroups(t, 2, 100*time.Millisecond)
	start := time.Now()
	err := gs[0].AllReduceF32([]float32{1}) // rank 1 never joins in
	require.Error(t, err)
	assert.ErrorIs(t, err, ErrBroken)
	assert.Contains(t, err.Error(), "did not answer within 100ms")
	assert.Less(t, time.Since(start), 3*time.Second)
	// Rank 1 learns about it on its next call.
	_, err = gs[1].Broadcast(nil)
	assert.ErrorIs(t, err, ErrBroken)
}

func TestRanksOutOfStep(t *testing.T) {
	gs := newGroups(t, 2, 0)
	errs := onAll(gs, func(g *Group) error {
		if g.Rank() == 0 {
			return g.Barrier()
		}
		return g.AllReduceF32([]float32{1, 2})
	})
	for r, err := range errs {
		require.Error(t, err, "rank %d", r)
		assert.ErrorIs(t, err, ErrBroken)
	}
	assert.Contains(t, errs[0].Error()+errs[1].Error(), "out of step")
}

func TestAllReduceLengthMismatch(t *testing.T) {
	gs := newGroups(t, 2, 0)
	errs := onAll(gs, func(g *Group) error {
		return g.AllReduceF32(make([]float32, 3+g.Rank()))
	})
	for r, err := range errs {
		require.Error(t, err, "rank %d", r)
		assert.ErrorIs(t, err, ErrBroken)
	}
	assert.Contains(t, errs[0].Error(), "rank 1 sent 4 floats, rank 0 has 3")
}

func TestHandshakeErrors(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	t.Run("size mismatch", func(t *testing.T) {
		l, err := Listen(Config{Rank: 0, Size: 2, Addr: "127.0.0.1:0"})
		require.NoError(t, err)
		errc := make(chan error, 1)
		go func() {
			_, err := Join(ctx, Config{Rank: 1, Size: 3, Addr: l.Addr()})
			errc <- err
		}()
		_, err = l.Accept(ctx)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "group has 3 ranks, rank 0 says 2")
		err = <-errc
		require.Error(t, err)
		assert.Contains(t, err.Error(), "rank 0 refused rank 1")
	})

	t.Run("duplicate rank", func(t *testing.T) {
		l, err := Listen(Config{Rank: 0, Size: 3, Addr: "127.0.0.1:0"})
		require.NoError(t, err)
		errs := make(chan error, 2)
		for range 2 {
			go func() {
				g, err := Join(ctx, Config{Rank: 1, Size: 3, Addr: l.Addr()})
				if g != nil {
					_ = g.Close()
				}
				errs <- err
			}()
		}
		_, err = l.Accept(ctx)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "rank 1 joined twice")
		// One was refused; the other loses its connection when Accept
		// gives up, and retries until ctx ends or fails: either way no
		// group forms. Only the refusal is checked here.
		assert.Error(t, <-errs)
	})

	t.Run("missing rank times out", func(t *testing.T) {
		l, err := Listen(Config{Rank: 0, Size: 3, Addr: "127.0.0.1:0"})
		require.NoError(t, err)
		sctx, scancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer scancel()
		go func() {
			g, err := Join(sctx, Config{Rank: 2, Size: 3, Addr: l.Addr()})
			if err == nil {
				_ = g.Close()
			}
		}()
		_, err = l.Accept(sctx)
		require.Error(t, err)
		assert.ErrorIs(t, err, context.DeadlineExceeded)
		assert.Contains(t, err.Error(), "waiting for ranks [1]")
	})

	t.Run("stray connection ignored", func(t *testing.T) {
		l, err := Listen(Config{Rank: 0, Size: 2, Addr: "127.0.0.1:0"})
		require.NoError(t, err)
		c, err := net.Dial("tcp", l.Addr())
		require.NoError(t, err)
		_, _ = c.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
		_ = c.Close()
		// A hello header announcing a 1 GiB payload is refused before
		// anything is allocated.
		c, err = net.Dial("tcp", l.Addr())
		require.NoError(t, err)
		_, _ = c.Write([]byte{kindHello, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x40})
		_ = c.Close()
		var g1 *Group
		done := make(chan error, 1)
		go func() {
			var err error
			g1, err = Join(ctx, Config{Rank: 1, Size: 2, Addr: l.Addr()})
			done <- err
		}()
		g0, err := l.Accept(ctx)
		require.NoError(t, err)
		require.NoError(t, <-done)
		require.NoError(t, onAll([]*Group{g0, g1}, (*Group).Barrier)[0])
		_ = g0.Close()
		_ = g1.Close()
	})
}

// The followers may start before rank 0 listens: they retry.
func TestJoinRetriesUntilLeaderListens(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	require.NoError(t, ln.Close())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res := make(chan error, 1)
	var g1 *Group
	go func() {
		var err error
		g1, err = Join(ctx, Config{Rank: 1, Size: 2, Addr: addr})
		res <- err
	}()
	time.Sleep(150 * time.Millisecond)
	g0, err := Join(ctx, Config{Rank: 0, Size: 2, Addr: addr})
	require.NoError(t, err)
	require.NoError(t, <-res)
	defer g0.Close()
	defer g1.Close()
	v := [][]float32{{1.5}, {2}}
	errs := onAll([]*Group{g0, g1}, func(g *Group) error { return g.AllReduceF32(v[g.Rank()]) })
	require.NoError(t, errs[0])
	require.NoError(t, errs[1])
	assert.Equal(t, float32(3.5), v[0][0])
	assert.Equal(t, float32(3.5), v[1][0])
}

func TestJoinBadConfig(t *testing.T) {
	_, err := Join(context.Background(), Config{Rank: 0, Size: 1, Addr: "x:1"})
	assert.Error(t, err)
	_, err = Listen(Config{Rank: 1, Size: 2, Addr: "127.0.0.1:0"})
	assert.ErrorContains(t, err, "only rank 0")
}

func benchAllReduce(b *testing.B, size, n int) {
	l, err := Listen(Config{Rank: 0, Size: size, Addr: "127.0.0.1:0"})
	require.NoError(b, err)
	gs := make([]*Group, size)
	var wg sync.WaitGroup
	for r := 1; r < size; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			g, err := Join(context.Background(), Config{Rank: r, Size: size, Addr: l.Addr()})
			if err != nil {
				b.Error(err)
			}
			gs[r] = g
		}()
	}
	gs[0], err = l.Accept(context.Background())
	require.NoError(b, err)
	wg.Wait()
	if b.Failed() {
		return
	}
	defer func() {
		for _, g := range gs {
			_ = g.Close()
		}
	}()
	stop := make(chan struct{})
	for r := 1; r < size; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v := make([]float32, n)
			for {
				if err := gs[r].AllReduceF32(v); err != nil {
					return
				}
				select {
				case <-stop:
					return
				default:
				}
			}
		}()
	}
	v := make([]float32, n)
	b.SetBytes(int64(4 * n))
	b.ResetTimer()
	for range b.N {
		if err := gs[0].AllReduceF32(v); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	close(stop)
	for _, g := range gs {
		_ = g.Close()
	}
	wg.Wait()
}

// Per-layer decode cost of the host all-reduce (gpt-oss hidden 2880) and a
// prefill chunk (512 tokens x 2880).
func BenchmarkAllReduce2x2880(b *testing.B)     { benchAllReduce(b, 2, 2880) }
func BenchmarkAllReduce2x512x2880(b *testing.B) { benchAllReduce(b, 2, 512*2880) }
