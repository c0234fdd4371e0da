package sdk

// The adapter side of the wire: a gRPC server that calls an Adapter, plus
// the recovery interceptors and message limits every adapter gets.

import (
	"context"
	"fmt"
	"runtime/debug"
	"sync"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/llama-orch/orch/sdk/internal/adapterv1"
)

// MaxMessageSize is the gRPC message limit on both sides of the wire
// (deliberately raised from gRPC's 4 MiB default: Evaluate rows of a
// 201088-token vocabulary are ~800 KB each, and logprob-heavy chunks add up).
const MaxMessageSize = 1 << 30

// evaluateChunkBytes bounds one Evaluate stream message (whole rows, at least one).
const evaluateChunkBytes = 8 << 20

// ServerOptions are the gRPC server options an adapter is served with:
// panic recovery interceptors and raised message limits. Serve applies
// them; in-process servers (tests, adaptertest) should too.
func ServerOptions(logger hclog.Logger) []grpc.ServerOption {
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	return []grpc.ServerOption{
		grpc.MaxRecvMsgSize(MaxMessageSize),
		grpc.MaxSendMsgSize(MaxMessageSize),
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (resp any, err error) {
			defer recoverInto(logger, info.FullMethod, &err)
			return h(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) (err error) {
			defer recoverInto(logger, info.FullMethod, &err)
			return h(srv, ss)
		}),
	}
}

func recoverInto(logger hclog.Logger, method string, err *error) {
	if r := recover(); r != nil {
		logger.Error("panic in adapter handler", "method", method, "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
		*err = withInfo(codes.Internal, fmt.Sprintf("adapter panic in %s: %v", method, r), reasonPanic, nil)
	}
}

// RegisterAdapter registers impl as the orch.adapter.v1 service on s. Serve
// does this; it is exported for in-process servers (tests).
func RegisterAdapter(s *grpc.Server, info Info, impl Adapter, logger hclog.Logger) {
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	pb.RegisterAdapterServiceServer(s, &wireServer{info: info, impl: impl, log: logger})
}

type wireServer struct {
	pb.UnimplementedAdapterServiceServer
	info Info
	impl Adapter
	log  hclog.Logger
}

func (s *wireServer) Describe(context.Context, *pb.DescribeRequest) (*pb.DescribeResponse, error) {
	return toInfo(s.info), nil
}

func (s *wireServer) Plan(ctx context.Context, req *pb.PlanRequest) (*pb.PlanResponse, error) {
	p, ok := s.impl.(Planner)
	if !ok {
		return nil, toStatus(fmt.Errorf("plan: %w", ErrNotImplemented))
	}
	plan, err := p.Plan(ctx, fromPlanRequest(req))
	if err != nil {
		return nil, toStatus(err)
	}
	return toMemoryPlan(plan), nil
}

// streamSender serialises Send on a server stream (gRPC streams are not safe
// for concurrent sends) and refuses sends after the handler returned.
type streamSender[T any] struct {
	mu     sync.Mutex
	closed bool
	send   func(*T) error
}

func (s *streamSender[T]) Send(m *T) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("send after the call returned: %w", ErrInvalidArgument)
	}
	return s.send(m)
}

func (s *streamSender[T]) close() {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
}

func (s *wireServer) Load(req *pb.LoadRequest, stream grpc.ServerStreamingServer[pb.LoadResponse]) error {
	out := &streamSender[pb.LoadResponse]{send: stream.Send}
	defer out.close()
	info, err := s.impl.Load(stream.Context(), fromLoadRequest(req), func(p LoadProgress) {
		if err := out.Send(toLoadProgress(p)); err != nil {
			s.log.Debug("dropping load progress", "error", err)
		}
	})
	if err != nil {
		return toStatus(err)
	}
	return toStatus(out.Send(toModelInfo(info)))
}

func (s *wireServer) Generate(req *pb.GenerateRequest, stream grpc.ServerStreamingServer[pb.GenerateResponse]) error {
	out := &streamSender[pb.GenerateResponse]{send: stream.Send}
	defer out.close()
	err := s.impl.Generate(stream.Context(), fromGenerateRequest(req), func(c Chunk) error {
		return out.Send(toChunk(c))
	})
	return toStatus(err)
}

func (s *wireServer) Cancel(ctx context.Context, req *pb.CancelRequest) (*pb.CancelResponse, error) {
	if err := s.impl.Cancel(ctx, req.GetId()); err != nil {
		return nil, toStatus(err)
	}
	return &pb.CancelResponse{}, nil
}

func (s *wireServer) Unload(ctx context.Context, _ *pb.UnloadRequest) (*pb.UnloadResponse, error) {
	if err := s.impl.Unload(ctx); err != nil {
		return nil, toStatus(err)
	}
	return &pb.UnloadResponse{}, nil
}

func (s *wireServer) Stats(ctx context.Context, _ *pb.StatsRequest) (*pb.StatsResponse, error) {
	st, err := s.impl.Stats(ctx)
	if err != nil {
		return nil, toStatus(err)
	}
	return toStats(st), nil
}

func (s *wireServer) Evaluate(req *pb.EvaluateRequest, stream grpc.ServerStreamingServer[pb.EvaluateResponse]) error {
	l, err := s.impl.Evaluate(stream.Context(), req.GetTokens())
	if err != nil {
		return toStatus(err)
	}
	if l.Rows < 0 || l.Vocab < 0 || len(l.Data) != l.Rows*l.Vocab {
		return status.Errorf(codes.Internal, "adapter returned malformed logits: %d values for %d x %d", len(l.Data), l.Rows, l.Vocab)
	}
	rowsPer := 1
	if l.Vocab > 0 {
		rowsPer = max(1, evaluateChunkBytes/(4*l.Vocab))
	}
	if l.Rows == 0 {
		return stream.Send(&pb.EvaluateResponse{Rows: 0, Vocab: int64(l.Vocab)})
	}
	for r := 0; r < l.Rows; r += rowsPer {
		end := min(l.Rows, r+rowsPer)
		if err := stream.Send(&pb.EvaluateResponse{
			Rows: int64(l.Rows), Vocab: int64(l.Vocab), Data: l.Data[r*l.Vocab : end*l.Vocab],
		}); err != nil {
			return err
		}
	}
	return nil
}
