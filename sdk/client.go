package sdk

// The host side of the wire: a typed client that implements Adapter over
// gRPC, and the go-plugin glue (handshake, plugin sets) shared by Serve and
// the host's launcher.

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"

	pb "github.com/llama-orch/orch/sdk/internal/adapterv1"
)

// ProtocolVersion is the adapter wire protocol version (go-plugin's
// negotiated version; VersionedPlugins key).
const ProtocolVersion = 1

// PluginName is the name under which the adapter is dispensed.
const PluginName = "adapter"

// Handshake is the go-plugin handshake shared by orch-host and adapters.
// The cookie only keeps users from running an adapter binary by hand; it is
// not a security measure.
var Handshake = plugin.HandshakeConfig{
	ProtocolVersion:  ProtocolVersion,
	MagicCookieKey:   "ORCH_PLUGIN_MAGIC_COOKIE",
	MagicCookieValue: "b6f0c1d2-orch-adapter-8f7e",
}

// RemoteAdapter is an Adapter reached over the wire. Plan returns an error
// matching ErrNotImplemented when the adapter does not implement Planner.
type RemoteAdapter interface {
	Adapter
	Planner
	// Describe asks the adapter for its Info.
	Describe(ctx context.Context) (Info, error)
}

// ClientPlugins is the VersionedPlugins map for a go-plugin client
// (the host). The dispensed value (PluginName) is a RemoteAdapter.
func ClientPlugins() map[int]plugin.PluginSet {
	return map[int]plugin.PluginSet{ProtocolVersion: {PluginName: &grpcPlugin{}}}
}

// ClientDialOptions are gRPC dial options matching the server's raised
// message limits.
func ClientDialOptions() []grpc.DialOption {
	return []grpc.DialOption{grpc.WithDefaultCallOptions(callOptions...)}
}

var callOptions = []grpc.CallOption{grpc.MaxCallRecvMsgSize(MaxMessageSize), grpc.MaxCallSendMsgSize(MaxMessageSize)}

// NewRemoteAdapter returns a RemoteAdapter speaking over conn (a connection
// to a server set up with ServerOptions and RegisterAdapter).
func NewRemoteAdapter(conn grpc.ClientConnInterface) RemoteAdapter {
	return &wireClient{c: pb.NewAdapterServiceClient(conn)}
}

// grpcPlugin is the go-plugin GRPCPlugin for adapters.
// On the adapter side reg registers the implementation; the host side
// leaves it nil and only dispenses clients.
type grpcPlugin struct {
	plugin.NetRPCUnsupportedPlugin
	reg func(*grpc.Server)
}

func (p *grpcPlugin) GRPCServer(_ *plugin.GRPCBroker, s *grpc.Server) error {
	if p.reg == nil {
		return errors.New("adapter plugin: no implementation on the client side")
	}
	p.reg(s)
	return nil
}

func (p *grpcPlugin) GRPCClient(_ context.Context, _ *plugin.GRPCBroker, conn *grpc.ClientConn) (any, error) {
	return NewRemoteAdapter(conn), nil
}

type wireClient struct {
	c pb.AdapterServiceClient
}

// wireErr maps a call's error; when the caller's own ctx ended, the result
// also matches ctx.Err() (and ErrCanceled for a cancel).
func wireErr(ctx context.Context, op string, err error) error {
	if err == nil {
		return nil
	}
	if cerr := ctx.Err(); cerr != nil {
		if errors.Is(cerr, context.Canceled) {
			return fmt.Errorf("%s: %w: %w", op, ErrCanceled, cerr)
		}
		return fmt.Errorf("%s: %w", op, cerr)
	}
	return fmt.Errorf("%s: %w", op, fromStatus(err))
}

func (c *wireClient) Describe(ctx context.Context) (Info, error) {
	r, err := c.c.Describe(ctx, &pb.DescribeRequest{}, callOptions...)
	if err != nil {
		return Info{}, wireErr(ctx, "describe", err)
	}
	if v := r.GetProtocolVersion(); v != 0 && v != wireProtocolVersion {
		return Info{}, fmt.Errorf("describe: adapter speaks wire protocol %d, host speaks %d", v, wireProtocolVersion)
	}
	return fromInfo(r), nil
}

func (c *wireClient) Plan(ctx context.Context, req LoadRequest) (MemoryPlan, error) {
	r, err := c.c.Plan(ctx, toPlanRequest(req), callOptions...)
	if err != nil {
		return MemoryPlan{}, wireErr(ctx, "plan", err)
	}
	return fromMemoryPlan(r), nil
}

func (c *wireClient) Load(ctx context.Context, req LoadRequest, progress func(LoadProgress)) (ModelInfo, error) {
	stream, err := c.c.Load(ctx, toLoadRequest(req), callOptions...)
	if err != nil {
		return ModelInfo{}, wireErr(ctx, "load", err)
	}
	for {
		m, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return ModelInfo{}, fmt.Errorf("load: adapter ended the stream without model info")
		}
		if err != nil {
			return ModelInfo{}, wireErr(ctx, "load", err)
		}
		switch ev := m.GetEvent().(type) {
		case *pb.LoadResponse_Progress:
			if progress != nil {
				progress(fromLoadProgress(ev.Progress))
			}
		case *pb.LoadResponse_Info:
			return fromModelInfo(ev.Info), nil
		}
	}
}

func (c *wireClient) Generate(ctx context.Context, req GenerateRequest, emit func(Chunk) error) error {
	// A derived context: when emit fails we cancel the stream so that the
	// adapter's Generate ctx ends too.
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.c.Generate(sctx, toGenerateRequest(req), callOptions...)
	if err != nil {
		return wireErr(ctx, "generate", err)
	}
	for {
		m, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return wireErr(ctx, "generate", err)
		}
		if err := emit(fromChunk(m)); err != nil {
			return err
		}
	}
}

func (c *wireClient) Cancel(ctx context.Context, id string) error {
	_, err := c.c.Cancel(ctx, &pb.CancelRequest{Id: id}, callOptions...)
	return wireErr(ctx, "cancel", err)
}

func (c *wireClient) Unload(ctx context.Context) error {
	_, err := c.c.Unload(ctx, &pb.UnloadRequest{}, callOptions...)
	return wireErr(ctx, "unload", err)
}

func (c *wireClient) Stats(ctx context.Context) (Stats, error) {
	r, err := c.c.Stats(ctx, &pb.StatsRequest{}, callOptions...)
	if err != nil {
		return Stats{}, wireErr(ctx, "stats", err)
	}
	return fromStats(r), nil
}

func (c *wireClient) Evaluate(ctx context.Context, tokens []int32) (Logits, error) {
	stream, err := c.c.Evaluate(ctx, &pb.EvaluateRequest{Tokens: tokens}, callOptions...)
	if err != nil {
		return Logits{}, wireErr(ctx, "evaluate", err)
	}
	var out Logits
	first := true
	for {
		m, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return Logits{}, wireErr(ctx, "evaluate", err)
		}
		if first {
			out.Rows, out.Vocab = int(m.GetRows()), int(m.GetVocab())
			if out.Rows < 0 || out.Vocab < 0 || int64(out.Rows)*int64(out.Vocab) > MaxMessageSize {
				return Logits{}, fmt.Errorf("evaluate: adapter announced an implausible shape %d x %d", out.Rows, out.Vocab)
			}
			out.Data = make([]float32, 0, out.Rows*out.Vocab)
			first = false
		}
		out.Data = append(out.Data, m.GetData()...)
	}
	if first {
		return Logits{}, fmt.Errorf("evaluate: adapter ended the stream without logits")
	}
	if len(out.Data) != out.Rows*out.Vocab {
		return Logits{}, fmt.Errorf("evaluate: got %d values for %d x %d logits", len(out.Data), out.Rows, out.Vocab)
	}
	return out, nil
}
