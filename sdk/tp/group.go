package tp

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"slices"
	"sync"
	"time"
)

// ErrBroken marks every error of a group that can no longer be used: a peer
// disconnected or failed, a collective timed out or the ranks fell out of
// step, or Close/Abort was called. Once broken, every pending and later call
// on the group returns an error matching it (errors.Is), on every rank.
var ErrBroken = errors.New("tensor-parallel group broken")

// ErrClosed is the cause recorded when the group was closed locally.
var ErrClosed = errors.New("group closed")

// Frame kinds on the wire. Every frame is a 13-byte header (kind u8,
// sequence u64, payload length u32, little endian) and the payload.
const (
	kindHello   byte = 1 // follower -> rank 0: magic, size, rank
	kindReady   byte = 2 // rank 0 -> follower: every rank joined
	kindReject  byte = 3 // rank 0 -> follower: handshake refused (payload: reason)
	kindBcast   byte = 4 // rank 0 -> follower: Broadcast payload
	kindReduce  byte = 5 // both ways: AllReduceF32 values (follower's, then the sum)
	kindBarrier byte = 6 // both ways: Barrier
	kindAbort   byte = 7 // either way: the sender gives up (payload: reason)
)

const (
	headerLen = 13
	// maxFrame bounds one frame's payload (an all-reduce of 256 Mi floats).
	maxFrame = 1 << 30
	// helloMagic opens the handshake (protocol version 1).
	helloMagic = "orch-tp/1"
	// handshakeTimeout bounds reading one dialer's hello on rank 0.
	handshakeTimeout = 10 * time.Second
	// abortWriteTimeout bounds the best-effort abort notice to a peer.
	abortWriteTimeout = time.Second
)

type frame struct {
	kind    byte
	seq     uint64
	payload []byte
}

// peer is one connection: rank 0 holds one per follower, a follower one to
// rank 0. A reader goroutine turns the stream into frames; frames is closed
// after the last frame once the connection fails (the reason is then the
// group's error).
type peer struct {
	rank   int
	conn   net.Conn
	frames chan frame
	wmu    sync.Mutex // one writer at a time (a collective, or an abort notice)
}

// Group is one rank's membership in a tensor-parallel group: TCP
// connections in a star around rank 0 (the leader). Its collectives
// (Broadcast, AllReduceF32, Barrier) must be called by every rank in the
// same order, like MPI's; they may be called from any goroutine but are
// serialised. Close and Abort may be called at any time, from any goroutine.
type Group struct {
	rank, size int
	timeout    time.Duration
	peers      []*peer // rank 0: peers[r] for r >= 1 (peers[0] nil); others: peers[0] = rank 0

	mu  sync.Mutex // serialises collectives
	seq uint64
	buf []byte // reused payload buffer for all-reduce (under mu)

	failOnce sync.Once
	broken   chan struct{}
	err      error // written once before broken is closed
	readers  sync.WaitGroup
}

// Rank is this member's index (0 = leader); Size the number of members.
func (g *Group) Rank() int { return g.rank }

// Size is the number of ranks in the group.
func (g *Group) Size() int { return g.size }

// Done is closed when the group breaks (a peer lost, Abort or Close).
func (g *Group) Done() <-chan struct{} { return g.broken }

// Err is nil while the group works, then the reason it broke (matching
// ErrBroken).
func (g *Group) Err() error {
	select {
	case <-g.broken:
		return g.err
	default:
		return nil
	}
}

// Close leaves the group: the connections are closed, so the other ranks'
// pending and later calls fail (ErrBroken). Safe to call more than once.
func (g *Group) Close() error {
	g.fail(ErrClosed, -1, false)
	g.readers.Wait()
	return nil
}

// Abort breaks the group with cause: the peers are told (best effort, so
// their errors name this rank's reason) and the connections closed. Use it
// when this rank cannot follow the others any more (a failed step).
func (g *Group) Abort(cause error) {
	if cause == nil {
		cause = errors.New("aborted")
	}
	g.fail(cause, -1, true)
	g.readers.Wait()
}

// fail breaks the group once: it records cause, optionally sends abort
// notices to every peer but skip, and closes every connection.
func (g *Group) fail(cause error, skip int, notify bool) {
	g.failOnce.Do(func() {
		g.err = fmt.Errorf("tp: rank %d: %w: %w", g.rank, ErrBroken, cause)
		close(g.broken)
		notice := cause.Error()
		if _, relayed := cause.(remoteAbort); !relayed {
			notice = fmt.Sprintf("rank %d: %s", g.rank, notice)
		}
		for _, p := range g.peers {
			if p == nil {
				continue
			}
			if notify && p.rank != skip && p.wmu.TryLock() {
				// Best effort: a writer blocked on this connection keeps
				// the lock, and the close below unblocks it instead.
				_ = p.conn.SetWriteDeadline(time.Now().Add(abortWriteTimeout))
				_ = writeFrame(p.conn, kindAbort, 0, []byte(notice))
				p.wmu.Unlock()
			}
			_ = p.conn.Close()
		}
	})
}

// remoteAbort is the reason another rank sent in its abort notice ("rank N:
// ..."), relayed unchanged by rank 0 to the other ranks.
type remoteAbort string

func (r remoteAbort) Error() string { return string(r) }

func newGroup(cfg Config, peers []*peer) *Group {
	g := &Group{rank: cfg.Rank, size: cfg.Size, timeout: cfg.Timeout, peers: peers, broken: make(chan struct{})}
	for _, p := range peers {
		if p == nil {
			continue
		}
		p.frames = make(chan frame, 4)
		g.readers.Add(1)
		go g.read(p)
	}
	return g
}

// read is p's reader goroutine.
func (g *Group) read(p *peer) {
	defer g.readers.Done()
	defer close(p.frames)
	for {
		f, err := readFrame(p.conn, maxFrame)
		if err != nil {
			g.fail(fmt.Errorf("connection to rank %d lost: %w", p.rank, err), p.rank, true)
			return
		}
		if f.kind == kindAbort {
			g.fail(remoteAbort(f.payload), p.rank, true)
			return
		}
		select {
		case p.frames <- f:
		case <-g.broken:
			return
		}
	}
}

func writeFrame(c net.Conn, kind byte, seq uint64, payload []byte) error {
	var h [headerLen]byte
	h[0] = kind
	binary.LittleEndian.PutUint64(h[1:], seq)
	binary.LittleEndian.PutUint32(h[9:], uint32(len(payload)))
	bufs := net.Buffers{h[:], payload}
	_, err := bufs.WriteTo(c)
	return err
}

// readFrame reads one frame whose payload may take up to max bytes (checked
// before allocating).
func readFrame(r io.Reader, max uint32) (frame, error) {
	var h [headerLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return frame{}, err
	}
	f := frame{kind: h[0], seq: binary.LittleEndian.Uint64(h[1:])}
	n := binary.LittleEndian.Uint32(h[9:])
	if n > max {
		return frame{}, fmt.Errorf("frame of %d bytes exceeds the %d-byte limit", n, max)
	}
	if f.kind < kindHello || f.kind > kindAbort {
		return frame{}, fmt.Errorf("unknown frame kind %d", f.kind)
	}
	f.payload = make([]byte, n)
	if _, err := io.ReadFull(r, f.payload); err != nil {
		return frame{}, err
	}
	return f, nil
}

var kindNames = map[byte]string{kindBcast: "broadcast", kindReduce: "all-reduce", kindBarrier: "barrier"}

// send writes one frame to p; a failure breaks the group.
func (g *Group) send(p *peer, kind byte, payload []byte) error {
	p.wmu.Lock()
	defer p.wmu.Unlock()
	if err := g.Err(); err != nil {
		return err
	}
	var dl time.Time
	if g.timeout > 0 {
		dl = time.Now().Add(g.timeout)
	}
	_ = p.conn.SetWriteDeadline(dl)
	if err := writeFrame(p.conn, kind, g.seq, payload); err != nil {
		g.fail(fmt.Errorf("send %s to rank %d: %w", kindNames[kind], p.rank, err), p.rank, true)
		return g.err
	}
	return nil
}

// recv waits for p's next frame, which must be kind with this op's sequence
// number; timed applies the group's timeout.
func (g *Group) recv(p *peer, kind byte, timed bool) (frame, error) {
	var tc <-chan time.Time
	if timed && g.timeout > 0 {
		t := time.NewTimer(g.timeout)
		defer t.Stop()
		tc = t.C
	}
	select {
	case f, ok := <-p.frames:
		if !ok {
			return frame{}, g.Err()
		}
		if f.kind != kind || f.seq != g.seq {
			g.fail(fmt.Errorf("ranks out of step: rank %d sent %s #%d, this rank expects %s #%d",
				p.rank, kindNames[f.kind], f.seq, kindNames[kind], g.seq), -1, true)
			return frame{}, g.err
		}
		return f, nil
	case <-tc:
		g.fail(fmt.Errorf("%s #%d: rank %d did not answer within %v", kindNames[kind], g.seq, p.rank, g.timeout), -1, true)
		return frame{}, g.err
	}
}

// Broadcast sends msg from rank 0 to every rank. On rank 0 it returns msg;
// on the others it waits (without a timeout: the leader may be idle) for
// rank 0's message and returns it (msg is ignored).
//
// A follower still receives the messages rank 0 sent before the group broke
// (rank 0's last step before it closed), then the error.
func (g *Group) Broadcast(msg []byte) ([]byte, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.seq++
	if g.rank == 0 {
		if err := g.Err(); err != nil {
			return nil, err
		}
		if len(msg) > maxFrame {
			return nil, fmt.Errorf("tp: broadcast of %d bytes exceeds the %d-byte limit", len(msg), maxFrame)
		}
		for _, p := range g.peers[1:] {
			if err := g.send(p, kindBcast, msg); err != nil {
				return nil, err
			}
		}
		return msg, nil
	}
	f, err := g.recv(g.peers[0], kindBcast, false)
	if err != nil {
		return nil, err
	}
	return f.payload, nil
}

// AllReduceF32 replaces v on every rank with the element-wise sum of v over
// the ranks. Every rank must pass the same length. The sum is formed on rank
// 0 in rank order (((v0 + v1) + v2) + ...) and sent back, so every rank gets
// bit-identical values.
func (g *Group) AllReduceF32(v []float32) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if err := g.Err(); err != nil {
		return err
	}
	g.seq++
	if 4*len(v) > maxFrame {
		err := fmt.Errorf("all-reduce of %d floats exceeds the %d-byte frame limit", len(v), maxFrame)
		g.fail(err, -1, true)
		return g.err
	}
	if g.rank != 0 {
		g.buf = appendF32(g.buf[:0], v)
		if err := g.send(g.peers[0], kindReduce, g.buf); err != nil {
			return err
		}
		f, err := g.recv(g.peers[0], kindReduce, true)
		if err != nil {
			return err
		}
		if len(f.payload) != 4*len(v) {
			g.fail(fmt.Errorf("all-reduce #%d: rank 0 returned %d bytes for %d floats", g.seq, len(f.payload), len(v)), -1, true)
			return g.err
		}
		readF32(v, f.payload)
		return nil
	}
	for _, p := range g.peers[1:] {
		f, err := g.recv(p, kindReduce, true)
		if err != nil {
			return err
		}
		if len(f.payload) != 4*len(v) {
			g.fail(fmt.Errorf("all-reduce #%d: rank %d sent %d floats, rank 0 has %d", g.seq, p.rank, len(f.payload)/4, len(v)), -1, true)
			return g.err
		}
		addF32(v, f.payload)
	}
	g.buf = appendF32(g.buf[:0], v)
	for _, p := range g.peers[1:] {
		if err := g.send(p, kindReduce, g.buf); err != nil {
			return err
		}
	}
	return nil
}

// Barrier returns once every rank has called it.
func (g *Group) Barrier() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if err := g.Err(); err != nil {
		return err
	}
	g.seq++
	if g.rank != 0 {
		if err := g.send(g.peers[0], kindBarrier, nil); err != nil {
			return err
		}
		_, err := g.recv(g.peers[0], kindBarrier, true)
		return err
	}
	for _, p := range g.peers[1:] {
		if _, err := g.recv(p, kindBarrier, true); err != nil {
			return err
		}
	}
	for _, p := range g.peers[1:] {
		if err := g.send(p, kindBarrier, nil); err != nil {
			return err
		}
	}
	return nil
}

func appendF32(b []byte, v []float32) []byte {
	b = slices.Grow(b, 4*len(v))
	for _, x := range v {
		b = binary.LittleEndian.AppendUint32(b, math.Float32bits(x))
	}
	return b
}

func readF32(v []float32, b []byte) {
	for i := range v {
		v[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
}

func addF32(v []float32, b []byte) {
	for i := range v {
		v[i] += math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
}

// Listener is rank 0's side of the rendezvous, split from Join so that the
// bound address is known before the other ranks dial (Addr "127.0.0.1:0"
// picks a free port; tests use that).
type Listener struct {
	cfg Config
	ln  net.Listener
}

// Listen opens rank 0's listening socket on cfg.Addr. cfg.Rank must be 0.
func Listen(cfg Config) (*Listener, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Rank != 0 {
		return nil, fmt.Errorf("tp: rank %d cannot listen: only rank 0 does", cfg.Rank)
	}
	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("tp: rank 0 listen on %s: %w", cfg.Addr, err)
	}
	return &Listener{cfg: cfg, ln: ln}, nil
}

// Addr is the bound address (host:port) the other ranks dial.
func (l *Listener) Addr() string { return l.ln.Addr().String() }

// Close stops listening (Accept closes it too).
func (l *Listener) Close() error { return l.ln.Close() }

// Accept waits until every other rank has dialed in and completed the
// handshake (their group size must match and each rank appear once), tells
// them the group is complete and returns rank 0's Group. It gives up when
// ctx ends, naming the ranks that did not join. The listener is closed when
// Accept returns.
func (l *Listener) Accept(ctx context.Context) (*Group, error) {
	defer l.ln.Close()
	size := l.cfg.Size
	peers := make([]*peer, size)
	ok := false
	defer func() {
		if !ok {
			for _, p := range peers {
				if p != nil {
					_ = p.conn.Close()
				}
			}
		}
	}()
	stop := context.AfterFunc(ctx, func() { _ = l.ln.Close() })
	defer stop()
	for joined := 1; joined < size; {
		c, err := l.ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("tp: rank 0 waiting for ranks %v: %w", missing(peers), ctx.Err())
			}
			return nil, fmt.Errorf("tp: rank 0 accept: %w", err)
		}
		rank, rsize, err := readHello(c)
		if err != nil {
			// Not one of ours (or it hung up): ignore it, keep waiting.
			_ = c.Close()
			continue
		}
		var reject error
		switch {
		case rsize != size:
			reject = fmt.Errorf("rank %d says the group has %d ranks, rank 0 says %d", rank, rsize, size)
		case rank < 1 || rank >= size:
			reject = fmt.Errorf("rank %d out of range [1, %d)", rank, size)
		case peers[rank] != nil:
			reject = fmt.Errorf("rank %d joined twice", rank)
		}
		if reject != nil {
			_ = c.SetWriteDeadline(time.Now().Add(handshakeTimeout))
			_ = writeFrame(c, kindReject, 0, []byte(reject.Error()))
			_ = c.Close()
			return nil, fmt.Errorf("tp: rank 0 handshake: %w", reject)
		}
		peers[rank] = &peer{rank: rank, conn: c}
		joined++
	}
	for _, p := range peers[1:] {
		_ = p.conn.SetWriteDeadline(time.Now().Add(handshakeTimeout))
		if err := writeFrame(p.conn, kindReady, 0, nil); err != nil {
			return nil, fmt.Errorf("tp: rank 0 handshake with rank %d: %w", p.rank, err)
		}
		_ = p.conn.SetDeadline(time.Time{})
	}
	ok = true
	return newGroup(l.cfg, peers), nil
}

func missing(peers []*peer) []int {
	var m []int
	for r := 1; r < len(peers); r++ {
		if peers[r] == nil {
			m = append(m, r)
		}
	}
	return m
}

func readHello(c net.Conn) (rank, size int, err error) {
	_ = c.SetReadDeadline(time.Now().Add(handshakeTimeout))
	defer func() { _ = c.SetReadDeadline(time.Time{}) }()
	f, err := readFrame(c, uint32(len(helloMagic)+8))
	if err != nil {
		return 0, 0, err
	}
	if f.kind != kindHello || len(f.payload) != len(helloMagic)+8 || string(f.payload[:len(helloMagic)]) != helloMagic {
		return 0, 0, errors.New("not an orch-tp hello")
	}
	p := f.payload[len(helloMagic):]
	return int(int32(binary.LittleEndian.Uint32(p[4:]))), int(int32(binary.LittleEndian.Uint32(p))), nil
}

// Join makes this process rank cfg.Rank of the group. Rank 0 listens on
// cfg.Addr and waits for every other rank; the others dial it, retrying
// until ctx ends (the host starts all ranks at once, so rank 0 may not be
// listening yet). Join returns once the whole group has met, on every rank.
func Join(ctx context.Context, cfg Config) (*Group, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Rank == 0 {
		l, err := Listen(cfg)
		if err != nil {
			return nil, err
		}
		return l.Accept(ctx)
	}
	delay := 10 * time.Millisecond
	for {
		g, retry, err := dial(ctx, cfg)
		if err == nil {
			return g, nil
		}
		if !retry {
			return nil, err
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("tp: rank %d joining rank 0 at %s: %w (last error: %v)", cfg.Rank, cfg.Addr, ctx.Err(), err)
		case <-t.C:
		}
		delay = min(2*delay, 200*time.Millisecond)
	}
}

// dial makes one attempt to join rank 0; retry says whether another may
// succeed (rank 0 not up yet, or the connection broke).
func dial(ctx context.Context, cfg Config) (*Group, bool, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", cfg.Addr)
	if err != nil {
		return nil, true, err
	}
	stop := context.AfterFunc(ctx, func() { _ = c.Close() })
	hello := make([]byte, 0, len(helloMagic)+8)
	hello = append(hello, helloMagic...)
	hello = binary.LittleEndian.AppendUint32(hello, uint32(cfg.Size))
	hello = binary.LittleEndian.AppendUint32(hello, uint32(cfg.Rank))
	if err := writeFrame(c, kindHello, 0, hello); err != nil {
		stop()
		_ = c.Close()
		return nil, true, err
	}
	f, err := readFrame(c, 4096)
	if !stop() {
		_ = c.Close()
		return nil, false, fmt.Errorf("tp: rank %d waiting for the group at %s: %w", cfg.Rank, cfg.Addr, ctx.Err())
	}
	if err != nil {
		_ = c.Close()
		return nil, true, err
	}
	switch f.kind {
	case kindReady:
		peers := []*peer{{rank: 0, conn: c}}
		return newGroup(cfg, peers), false, nil
	case kindReject:
		_ = c.Close()
		return nil, false, fmt.Errorf("tp: rank 0 refused rank %d: %s", cfg.Rank, f.payload)
	default:
		_ = c.Close()
		return nil, true, fmt.Errorf("unexpected handshake frame kind %d", f.kind)
	}
}
