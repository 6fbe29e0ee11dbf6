package hostagent

import (
	"io"
	"runtime"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
)

// metrics are the host agent's Prometheus metrics. Events are counted
// where they happen; what is a state (guests, leases) is read from the
// exports when scraped, by stateCollector.
type metrics struct {
	reg         *prometheus.Registry
	published   *prometheus.CounterVec   // export
	failed      *prometheus.CounterVec   // export
	freeze      *prometheus.HistogramVec // export
	announceAck *prometheus.HistogramVec // export
	breakAck    *prometheus.HistogramVec // export
	quota       *prometheus.CounterVec   // export, limit
	served      *prometheus.CounterVec   // export, kind
}

// Freezes are meant to take milliseconds; the budget is seconds.
var freezeBuckets = []float64{.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5}

// Round trips to a guest: sub-millisecond to the ack deadline.
var ackBuckets = []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}

func newMetrics(s *Server) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		published: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "leasefs_generations_published_total",
			Help: "Generations published."}, []string{"export"}),
		failed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "leasefs_publish_failures_total",
			Help: "Publishes that failed (the generation before stays current)."}, []string{"export"}),
		freeze: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "leasefs_freeze_seconds",
			Help: "How long each publish kept the filesystem frozen.", Buckets: freezeBuckets}, []string{"export"}),
		announceAck: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "leasefs_publish_ack_seconds",
			Help: "From a generation's publish to a guest's acknowledgement of it, per guest.", Buckets: ackBuckets}, []string{"export"}),
		breakAck: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "leasefs_break_ack_seconds",
			Help: "From a lease break sent to a guest to its acknowledgement.", Buckets: ackBuckets}, []string{"export"}),
		quota: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "leasefs_quota_rejections_total",
			Help: "Requests refused by a limit: leases (per guest or host-wide files) or connections per guest."}, []string{"export", "limit"}),
		served: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "leasefs_served_bytes_total",
			Help: "Bytes sent to guests: metadata blocks, digests of metadata blocks (for guests that read them from the device), or file data for guests without the device."}, []string{"export", "kind"}),
	}
	m.reg.MustRegister(m.published, m.failed, m.freeze, m.announceAck, m.breakAck, m.quota, m.served, stateCollector{s})
	build := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "leasefs_build_info",
		Help: "Always 1: the agent's version and the Go it was built with."}, []string{"version", "goversion"})
	build.WithLabelValues(s.opt.Version, runtime.Version()).Set(1)
	m.reg.MustRegister(build)
	m.quota.WithLabelValues("", "connections")
	return m
}

// addExport makes an export's series exist from the start.
func (m *metrics) addExport(name string) {
	m.published.WithLabelValues(name)
	m.failed.WithLabelValues(name)
	m.quota.WithLabelValues(name, "leases")
	m.served.WithLabelValues(name, "meta")
	m.served.WithLabelValues(name, "data")
	m.served.WithLabelValues(name, "digests")
}

// removeExport drops an export's series.
func (m *metrics) removeExport(name string) {
	for _, v := range []interface{ DeletePartialMatch(prometheus.Labels) int }{m.published, m.failed, m.freeze, m.announceAck, m.breakAck, m.quota, m.served} {
		v.DeletePartialMatch(prometheus.Labels{"export": name})
	}
}

// Gatherer returns the server's metrics, for a promhttp handler.
func (s *Server) Gatherer() prometheus.Gatherer { return s.m.reg }

// WriteMetrics writes the server's metrics in the Prometheus text format.
func (s *Server) WriteMetrics(w io.Writer) error {
	mfs, err := s.m.reg.Gather()
	if err != nil {
		return err
	}
	enc := expfmt.NewEncoder(w, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, mf := range mfs {
		if err := enc.Encode(mf); err != nil {
			return err
		}
	}
	return nil
}

func since(t time.Time) float64 { return time.Since(t).Seconds() }

// stateCollector reports what the exports hold at the time of a scrape.
type stateCollector struct{ s *Server }

var (
	descGeneration = prometheus.NewDesc("leasefs_generation", "The export's current generation.", []string{"export"}, nil)
	descGuests     = prometheus.NewDesc("leasefs_guests", "Guests connected.", []string{"export"}, nil)
	descLeases     = prometheus.NewDesc("leasefs_leases", "Leases held by guests.", []string{"export"}, nil)
	descFiles      = prometheus.NewDesc("leasefs_leased_files", "Files the host holds open for guests.", []string{"export"}, nil)
	descBreaking   = prometheus.NewDesc("leasefs_breaks_pending", "Files whose lease break waits for guests' acknowledgements.", []string{"export"}, nil)
	descBreaks     = prometheus.NewDesc("leasefs_breaks_total", "Lease breaks: a host writer opened or changed a leased file.", []string{"export"}, nil)
	descRevoked    = prometheus.NewDesc("leasefs_leases_revoked_total", "Leases revoked because a guest missed the ack deadline.", []string{"export"}, nil)
	descStore      = prometheus.NewDesc("leasefs_metadata_store_bytes", "Bytes of metadata blocks kept for the generations guests are on.", []string{"export"}, nil)
	descPublished  = prometheus.NewDesc("leasefs_last_publish_timestamp_seconds", "When the export's current generation was published (Unix time).", []string{"export"}, nil)
	descLabel      = prometheus.NewDesc("leasefs_generation_label", "Always 1: the label the export's current generation was published with.", []string{"export", "label"}, nil)
	descLag        = prometheus.NewDesc("leasefs_guest_generation_lag", "How many generations a connected guest is behind the export's current one.", []string{"export", "guest"}, nil)
	descKept       = prometheus.NewDesc("leasefs_kept_files", "Files held so that the kept generations stay whole.", []string{"export"}, nil)
	descKeptGone   = prometheus.NewDesc("leasefs_kept_replaced_files", "Of those, files the writer replaced or deleted since: kept for older generations only.", []string{"export"}, nil)
	descKeptBytes  = prometheus.NewDesc("leasefs_kept_replaced_bytes", "The size of the replaced or deleted files kept: space the writer does not get back until guests move on.", []string{"export"}, nil)
	descLost       = prometheus.NewDesc("leasefs_export_lost", "Always 1: an export no longer served because its filesystem went away (unmounted, read-only, device gone).", []string{"export"}, nil)
)

func (c stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descGeneration, descGuests, descLeases, descFiles, descBreaking, descBreaks, descRevoked, descStore, descPublished, descLag, descLabel, descLost, descKept, descKeptGone, descKeptBytes} {
		ch <- d
	}
}

func (c stateCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.s.Status()
	for _, l := range st.Lost {
		emit(ch, descLost, prometheus.GaugeValue, 1, l.Name)
	}
	for _, e := range st.Exports {
		gauge := func(d *prometheus.Desc, v float64) { emit(ch, d, prometheus.GaugeValue, v, e.Name) }
		counter := func(d *prometheus.Desc, v uint64) { emit(ch, d, prometheus.CounterValue, float64(v), e.Name) }
		gauge(descGeneration, float64(e.Generation))
		gauge(descGuests, float64(len(e.Guests)))
		gauge(descLeases, float64(e.Leases))
		gauge(descFiles, float64(e.Files))
		gauge(descBreaking, float64(e.PendingBreaks))
		gauge(descStore, float64(e.StoreBytes))
		gauge(descKept, float64(e.KeptFiles))
		gauge(descKeptGone, float64(e.KeptReplaced))
		gauge(descKeptBytes, float64(e.KeptBytes))
		counter(descBreaks, e.Breaks)
		counter(descRevoked, e.Revoked)
		if !e.Published.IsZero() {
			gauge(descPublished, float64(e.Published.UnixNano())/1e9)
		}
		if e.Label != "" {
			emit(ch, descLabel, prometheus.GaugeValue, 1, e.Name, e.Label)
		}
		for _, g := range e.Guests {
			emit(ch, descLag, prometheus.GaugeValue, float64(e.Generation-min(g.Generation, e.Generation)), e.Name, g.Peer)
		}
	}
}

// emit sends a metric with its label values made valid UTF-8: names from
// outside (a VM's socket name, a peer, a label) are bytes, and the client
// library panics on anything else.
func emit(ch chan<- prometheus.Metric, d *prometheus.Desc, t prometheus.ValueType, v float64, labels ...string) {
	for i, l := range labels {
		labels[i] = strings.ToValidUTF8(l, "\uFFFD")
	}
	if m, err := prometheus.NewConstMetric(d, t, v, labels...); err == nil {
		ch <- m
	}
}
