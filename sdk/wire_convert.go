package sdk

// Converters between the public Go types and the generated protobuf messages
// of orch.adapter.v1 (to* for Go -> proto, from* for proto -> Go). They live
// in package sdk rather than internal/{toproto,fromproto} packages because
// Serve and the client are in package sdk and would otherwise form an
// import cycle with them. Nil messages convert to zero values, never a panic.

import (
	"time"

	pb "github.com/llama-orch/orch/sdk/internal/adapterv1"
)

// wireProtocolVersion is the wire protocol version these messages belong to.
const wireProtocolVersion = 1

// toInfo converts adapter info into a Describe response.
func toInfo(in Info) *pb.DescribeResponse {
	return &pb.DescribeResponse{
		Name:            in.Name,
		Version:         in.Version,
		Architectures:   in.Architectures,
		Dtypes:          in.DTypes,
		Features:        in.Features,
		ProtocolVersion: wireProtocolVersion,
	}
}

// toLoadOptions converts load options.
func toLoadOptions(in LoadOptions) *pb.LoadOptions {
	return &pb.LoadOptions{
		Device:          in.Device,
		ContextLength:   int64(in.ContextLength),
		MaxSequences:    int64(in.MaxSequences),
		KvCacheFraction: in.KVCacheFraction,
		Threads:         int64(in.Threads),
		Extra:           in.Extra,
	}
}

// toLoadRequest converts a load request.
func toLoadRequest(in LoadRequest) *pb.LoadRequest {
	return &pb.LoadRequest{Path: in.Path, Options: toLoadOptions(in.Options)}
}

// toPlanRequest converts a load request into a plan request.
func toPlanRequest(in LoadRequest) *pb.PlanRequest {
	return &pb.PlanRequest{Path: in.Path, Options: toLoadOptions(in.Options)}
}

// toMemoryPlan converts a memory plan.
func toMemoryPlan(in MemoryPlan) *pb.PlanResponse {
	return &pb.PlanResponse{
		Device:         in.Device,
		WeightBytes:    in.WeightBytes,
		KvBytes:        in.KVBytes,
		WorkspaceBytes: in.WorkspaceBytes,
		FreeBytes:      in.FreeBytes,
	}
}

// toLoadProgress converts a progress event into a Load stream message.
func toLoadProgress(in LoadProgress) *pb.LoadResponse {
	return &pb.LoadResponse{Event: &pb.LoadResponse_Progress{Progress: &pb.LoadProgress{
		Stage: in.Stage, Done: in.Done, Total: in.Total,
	}}}
}

// toModelInfo converts the final model info into a Load stream message.
func toModelInfo(in ModelInfo) *pb.LoadResponse {
	return &pb.LoadResponse{Event: &pb.LoadResponse_Info{Info: &pb.ModelInfo{
		Architecture:  in.Architecture,
		Name:          in.Name,
		Backend:       in.Backend,
		DeviceName:    in.DeviceName,
		ContextLength: int64(in.ContextLength),
		VocabSize:     int64(in.VocabSize),
		MaxSequences:  int64(in.MaxSequences),
		ParamCount:    in.ParamCount,
		WeightBytes:   in.WeightBytes,
		KvBytes:       in.KVBytes,
	}}}
}

// toGenerateRequest converts a generate request.
func toGenerateRequest(in GenerateRequest) *pb.GenerateRequest {
	s := in.Sampling
	return &pb.GenerateRequest{
		Id:         in.ID,
		Prompt:     in.Prompt,
		MaxTokens:  int64(in.MaxTokens),
		MinTokens:  int64(in.MinTokens),
		StopTokens: in.StopTokens,
		Sampling: &pb.SamplingParams{
			Temperature:       s.Temperature,
			TopK:              int32(s.TopK),
			TopP:              s.TopP,
			MinP:              s.MinP,
			Seed:              s.Seed,
			HasSeed:           s.HasSeed,
			RepetitionPenalty: s.RepetitionPenalty,
			PresencePenalty:   s.PresencePenalty,
			FrequencyPenalty:  s.FrequencyPenalty,
			LogitBias:         s.LogitBias,
		},
		TopLogprobs: int32(in.TopLogprobs),
		Logprobs:    in.Logprobs,
	}
}

// toFinishReason converts a finish reason. Unknown reasons become ERROR.
func toFinishReason(in FinishReason) pb.FinishReason {
	switch in {
	case FinishNone:
		return pb.FinishReason_FINISH_REASON_UNSPECIFIED
	case FinishStop:
		return pb.FinishReason_FINISH_REASON_STOP
	case FinishLength:
		return pb.FinishReason_FINISH_REASON_LENGTH
	case FinishCanceled:
		return pb.FinishReason_FINISH_REASON_CANCELED
	default:
		return pb.FinishReason_FINISH_REASON_ERROR
	}
}

// toChunk converts a generated chunk.
func toChunk(in Chunk) *pb.GenerateResponse {
	out := &pb.GenerateResponse{Tokens: in.Tokens, Finish: toFinishReason(in.Finish)}
	if len(in.Info) > 0 {
		out.Info = make([]*pb.TokenInfo, len(in.Info))
		for i, ti := range in.Info {
			p := &pb.TokenInfo{Logprob: ti.Logprob}
			if len(ti.Top) > 0 {
				p.Top = make([]*pb.TokenLogprob, len(ti.Top))
				for j, t := range ti.Top {
					p.Top[j] = &pb.TokenLogprob{Token: t.Token, Logprob: t.Logprob}
				}
			}
			out.Info[i] = p
		}
	}
	if t := in.Timings; t != nil {
		out.Timings = &pb.Timings{
			PromptTokens:    int64(t.PromptTokens),
			CachedTokens:    int64(t.CachedTokens),
			GeneratedTokens: int64(t.GeneratedTokens),
			QueueTimeNs:     int64(t.QueueTime),
			PromptTimeNs:    int64(t.PromptTime),
			GenerateTimeNs:  int64(t.GenerateTime),
		}
	}
	return out
}

// toStats converts a stats snapshot.
func toStats(in Stats) *pb.StatsResponse {
	return &pb.StatsResponse{
		Running:         int64(in.Running),
		Waiting:         int64(in.Waiting),
		KvUsedBlocks:    int64(in.KVUsedBlocks),
		KvTotalBlocks:   int64(in.KVTotalBlocks),
		PrefixQueries:   in.PrefixQueries,
		PrefixHits:      in.PrefixHits,
		TokensPerSecond: in.TokensPerSecond,
	}
}

// fromInfo converts a Describe response.
func fromInfo(in *pb.DescribeResponse) Info {
	return Info{
		Name:          in.GetName(),
		Version:       in.GetVersion(),
		Architectures: in.GetArchitectures(),
		DTypes:        in.GetDtypes(),
		Features:      in.GetFeatures(),
	}
}

// fromLoadOptions converts load options.
func fromLoadOptions(in *pb.LoadOptions) LoadOptions {
	return LoadOptions{
		Device:          in.GetDevice(),
		ContextLength:   int(in.GetContextLength()),
		MaxSequences:    int(in.GetMaxSequences()),
		KVCacheFraction: in.GetKvCacheFraction(),
		Threads:         int(in.GetThreads()),
		Extra:           in.GetExtra(),
	}
}

// fromLoadRequest converts a load request.
func fromLoadRequest(in *pb.LoadRequest) LoadRequest {
	return LoadRequest{Path: in.GetPath(), Options: fromLoadOptions(in.GetOptions())}
}

// fromPlanRequest converts a plan request into the load request it plans.
func fromPlanRequest(in *pb.PlanRequest) LoadRequest {
	return LoadRequest{Path: in.GetPath(), Options: fromLoadOptions(in.GetOptions())}
}

// fromMemoryPlan converts a plan response.
func fromMemoryPlan(in *pb.PlanResponse) MemoryPlan {
	return MemoryPlan{
		Device:         in.GetDevice(),
		WeightBytes:    in.GetWeightBytes(),
		KVBytes:        in.GetKvBytes(),
		WorkspaceBytes: in.GetWorkspaceBytes(),
		FreeBytes:      in.GetFreeBytes(),
	}
}

// fromLoadProgress converts a progress event.
func fromLoadProgress(in *pb.LoadProgress) LoadProgress {
	return LoadProgress{Stage: in.GetStage(), Done: in.GetDone(), Total: in.GetTotal()}
}

// fromModelInfo converts model info.
func fromModelInfo(in *pb.ModelInfo) ModelInfo {
	return ModelInfo{
		Architecture:  in.GetArchitecture(),
		Name:          in.GetName(),
		Backend:       in.GetBackend(),
		DeviceName:    in.GetDeviceName(),
		ContextLength: int(in.GetContextLength()),
		VocabSize:     int(in.GetVocabSize()),
		MaxSequences:  int(in.GetMaxSequences()),
		ParamCount:    in.GetParamCount(),
		WeightBytes:   in.GetWeightBytes(),
		KVBytes:       in.GetKvBytes(),
	}
}

// fromGenerateRequest converts a generate request.
func fromGenerateRequest(in *pb.GenerateRequest) GenerateRequest {
	s := in.GetSampling()
	return GenerateRequest{
		ID:         in.GetId(),
		Prompt:     in.GetPrompt(),
		MaxTokens:  int(in.GetMaxTokens()),
		MinTokens:  int(in.GetMinTokens()),
		StopTokens: in.GetStopTokens(),
		Sampling: SamplingParams{
			Temperature:       s.GetTemperature(),
			TopK:              int(s.GetTopK()),
			TopP:              s.GetTopP(),
			MinP:              s.GetMinP(),
			Seed:              s.GetSeed(),
			HasSeed:           s.GetHasSeed(),
			RepetitionPenalty: s.GetRepetitionPenalty(),
			PresencePenalty:   s.GetPresencePenalty(),
			FrequencyPenalty:  s.GetFrequencyPenalty(),
			LogitBias:         s.GetLogitBias(),
		},
		TopLogprobs: int(in.GetTopLogprobs()),
		Logprobs:    in.GetLogprobs(),
	}
}

// fromFinishReason converts a finish reason.
func fromFinishReason(in pb.FinishReason) FinishReason {
	switch in {
	case pb.FinishReason_FINISH_REASON_UNSPECIFIED:
		return FinishNone
	case pb.FinishReason_FINISH_REASON_STOP:
		return FinishStop
	case pb.FinishReason_FINISH_REASON_LENGTH:
		return FinishLength
	case pb.FinishReason_FINISH_REASON_CANCELED:
		return FinishCanceled
	default:
		return FinishError
	}
}

// fromChunk converts a generated chunk.
func fromChunk(in *pb.GenerateResponse) Chunk {
	out := Chunk{Tokens: in.GetTokens(), Finish: fromFinishReason(in.GetFinish())}
	if infos := in.GetInfo(); len(infos) > 0 {
		out.Info = make([]TokenInfo, len(infos))
		for i, ti := range infos {
			out.Info[i].Logprob = ti.GetLogprob()
			if top := ti.GetTop(); len(top) > 0 {
				out.Info[i].Top = make([]TokenLogprob, len(top))
				for j, t := range top {
					out.Info[i].Top[j] = TokenLogprob{Token: t.GetToken(), Logprob: t.GetLogprob()}
				}
			}
		}
	}
	if t := in.GetTimings(); t != nil {
		out.Timings = &Timings{
			PromptTokens:    int(t.GetPromptTokens()),
			CachedTokens:    int(t.GetCachedTokens()),
			GeneratedTokens: int(t.GetGeneratedTokens()),
			QueueTime:       time.Duration(t.GetQueueTimeNs()),
			PromptTime:      time.Duration(t.GetPromptTimeNs()),
			GenerateTime:    time.Duration(t.GetGenerateTimeNs()),
		}
	}
	return out
}

// fromStats converts a stats response.
func fromStats(in *pb.StatsResponse) Stats {
	return Stats{
		Running:         int(in.GetRunning()),
		Waiting:         int(in.GetWaiting()),
		KVUsedBlocks:    int(in.GetKvUsedBlocks()),
		KVTotalBlocks:   int(in.GetKvTotalBlocks()),
		PrefixQueries:   in.GetPrefixQueries(),
		PrefixHits:      in.GetPrefixHits(),
		TokensPerSecond: in.GetTokensPerSecond(),
	}
}
