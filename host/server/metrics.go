package server

import (
	"context"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metric names follow vLLM's where the meaning is the same (dashboards built
// for vLLM work unchanged); orch-only metrics use the orch: prefix. Every
// metric carries the model_name label.
var (
	latencyBuckets = []float64{0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640, 2560}
	itlBuckets     = []float64{0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80}
)

type metrics struct {
	ttft        *prometheus.HistogramVec
	itl         *prometheus.HistogramVec
	e2e         *prometheus.HistogramVec
	queue       *prometheus.HistogramVec
	running     *prometheus.GaugeVec
	waiting     *prometheus.GaugeVec
	promptTok   *prometheus.CounterVec
	genTok      *prometheus.CounterVec
	success     *prometheus.CounterVec
	aborted     *prometheus.CounterVec
	rejected    *prometheus.CounterVec
	failed      *prometheus.CounterVec
	kvCollector *kvCollector
}

func newMetrics(reg prometheus.Registerer) *metrics {
	l := []string{"model_name"}
	m := &metrics{
		ttft: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "vllm:time_to_first_token_seconds",
			Help: "Histogram of time to first token in seconds (from request arrival, queue time included).", Buckets: latencyBuckets}, l),
		itl: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "vllm:inter_token_latency_seconds",
			Help: "Histogram of inter-token latency in seconds.", Buckets: itlBuckets}, l),
		e2e: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "vllm:e2e_request_latency_seconds",
			Help: "Histogram of end to end request latency in seconds.", Buckets: latencyBuckets}, l),
		queue: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "vllm:request_queue_time_seconds",
			Help: "Histogram of time spent waiting in the host's request queue in seconds.", Buckets: latencyBuckets}, l),
		running: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "vllm:num_requests_running",
			Help: "Number of requests admitted to the adapter."}, l),
		waiting: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "vllm:num_requests_waiting",
			Help: "Number of requests waiting in the host's queue."}, l),
		promptTok: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vllm:prompt_tokens_total",
			Help: "Number of prefill tokens processed."}, l),
		genTok: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vllm:generation_tokens_total",
			Help: "Number of generation tokens processed."}, l),
		success: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vllm:request_success_total",
			Help: "Count of successfully processed requests, by the finish reason of their first choice."}, []string{"model_name", "finished_reason"}),
		aborted: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "orch:request_aborted_total",
			Help: "Requests whose client went away (or that shutdown canceled) before they finished."}, l),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "orch:request_rejected_total",
			Help: "Requests refused before generation, by reason (queue_full, invalid, shutting_down)."}, []string{"model_name", "reason"}),
		failed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "orch:request_failed_total",
			Help: "Requests that failed with an adapter error."}, l),
		kvCollector: &kvCollector{desc: prometheus.NewDesc("vllm:kv_cache_usage_perc",
			"KV-cache usage reported by the adapter (1 = 100%).", l, nil)},
	}
	reg.MustRegister(m.ttft, m.itl, m.e2e, m.queue, m.running, m.waiting, m.promptTok, m.genTok,
		m.success, m.aborted, m.rejected, m.failed, m.kvCollector)
	return m
}

// modelMetrics are the metric children of one model.
type modelMetrics struct {
	ttft, itl, e2e, queue prometheus.Observer
	running, waiting      prometheus.Gauge
	promptTok, genTok     prometheus.Counter
	aborted, failed       prometheus.Counter
	success               func(reason string)
	rejected              func(reason string)
}

func (m *metrics) forModel(name string) *modelMetrics {
	return &modelMetrics{
		ttft: m.ttft.WithLabelValues(name), itl: m.itl.WithLabelValues(name),
		e2e: m.e2e.WithLabelValues(name), queue: m.queue.WithLabelValues(name),
		running: m.running.WithLabelValues(name), waiting: m.waiting.WithLabelValues(name),
		promptTok: m.promptTok.WithLabelValues(name), genTok: m.genTok.WithLabelValues(name),
		aborted: m.aborted.WithLabelValues(name), failed: m.failed.WithLabelValues(name),
		success:  func(r string) { m.success.WithLabelValues(name, r).Inc() },
		rejected: func(r string) { m.rejected.WithLabelValues(name, r).Inc() },
	}
}

// kvCollector asks each adapter for its KV use at scrape time.
type kvCollector struct {
	desc   *prometheus.Desc
	mu     sync.Mutex
	models []*servedModel
}

func (c *kvCollector) add(m *servedModel) {
	c.mu.Lock()
	c.models = append(c.models, m)
	c.mu.Unlock()
}

func (c *kvCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *kvCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	models := append([]*servedModel(nil), c.models...)
	c.mu.Unlock()
	for _, m := range models {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		st, err := m.Adapter.Stats(ctx)
		cancel()
		if err != nil || st.KVTotalBlocks <= 0 {
			continue
		}
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue,
			float64(st.KVUsedBlocks)/float64(st.KVTotalBlocks), m.ID)
	}
}
