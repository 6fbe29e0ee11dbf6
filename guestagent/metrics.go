package guestagent

import (
	"github.com/prometheus/client_golang/prometheus"
)

// clientMetrics are a guest's Prometheus metrics.
type clientMetrics struct {
	reg           *prometheus.Registry
	metaFetches   prometheus.Counter
	metaBytes     prometheus.Counter
	digestFetches prometheus.Counter
	cacheHits     prometheus.Counter
	cacheMisses   prometheus.Counter
	inval         *prometheus.CounterVec // kind: inode, entry
	data          *prometheus.CounterVec // source: device, host, inline
	switches      prometheus.Counter
	reconnects    prometheus.Counter
	breaks        prometheus.Counter
	readsRedone   prometheus.Counter
	openRefusals  *prometheus.CounterVec // why
	leasesReused  prometheus.Counter
	interrupted   prometheus.Counter
}

func newClientMetrics(c *Client) *clientMetrics {
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: "leasefs_guest_" + name, Help: help})
	}
	m := &clientMetrics{
		reg:         prometheus.NewRegistry(),
		metaFetches: counter("metadata_fetches_total", "Metadata requests to the host (each for the blocks one read missed)."),
		metaBytes:   counter("metadata_fetched_bytes_total", "Bytes of metadata blocks fetched from the host."),
		digestFetches: counter("metadata_digest_fetches_total",
			"Requests to the host for the digests of a window of metadata blocks, which are then read from the device."),
		cacheHits:   counter("metadata_cache_hits_total", "Metadata blocks found in the guest's cache of its generation."),
		cacheMisses: counter("metadata_cache_misses_total", "Metadata blocks that had to be fetched from the host."),
		inval: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "leasefs_guest_invalidations_total",
			Help: "Invalidations sent to the kernel: an inode's attributes and pages, or a name in a directory."}, []string{"kind"}),
		data: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "leasefs_guest_data_bytes_total",
			Help: "File data read: from the shared device, through the host, or inline in the inode."}, []string{"source"}),
		switches:   counter("generation_switches_total", "Moves to a newer generation."),
		reconnects: counter("reconnects_total", "Connections to the host made again after one was lost."),
		breaks:     counter("lease_breaks_total", "Leases the host broke (a writer wanted the file)."),
		readsRedone: counter("device_reads_redone_total",
			"Device reads thrown away because the session that held the lease was lost (or went quiet) while they read."),
		leasesReused: counter("leases_reused_total", "Opens served by a lease kept after the file's last close, without asking the host."),
		interrupted: counter("requests_interrupted_total",
			"Applications' requests that ended EINTR because the application was interrupted (a signal) while they waited for the host."),
		openRefusals: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "leasefs_guest_open_refusals_total",
			Help: "Opens the host refused, by the answer given to the application."}, []string{"error"}),
	}
	gen := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "leasefs_guest_generation", Help: "The generation served."},
		func() float64 { return float64(c.Generation()) })
	open := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "leasefs_guest_open_files", Help: "Files open under a lease."},
		func() float64 { c.mu.Lock(); defer c.mu.Unlock(); return float64(len(c.files.leases)) })
	cached := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "leasefs_guest_metadata_cache_bytes",
		Help: "Bytes of metadata blocks cached (bounded by --cache-mb)."},
		func() float64 { return float64(c.cache.stats().Bytes) })
	fromDev := prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "leasefs_guest_metadata_device_blocks_total",
		Help: "Metadata blocks read from the shared device that checked against the host's digests."},
		func() float64 { return float64(c.cache.stats().FromDevice) })
	unchecked := prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "leasefs_guest_metadata_device_unchecked_total",
		Help: "Metadata blocks wanted from the device that did not check (written since the generation) or had no digest: fetched from the host."},
		func() float64 { return float64(c.cache.stats().Unchecked) })
	nodes := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "leasefs_guest_kernel_nodes",
		Help: "Inodes the kernel holds of the mount (what the guest keeps a node for)."},
		func() float64 { return float64(c.fs.Nodes()) })
	device := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "leasefs_guest_device_verified",
		Help: "1 while file data is read from the shared device, verified; 0 while it comes through the host."},
		func() float64 {
			if c.deviceOK() {
				return 1
			}
			return 0
		})
	m.reg.MustRegister(m.metaFetches, m.metaBytes, m.digestFetches, m.cacheHits, m.cacheMisses, m.inval, m.data,
		m.switches, m.reconnects, m.breaks, m.readsRedone, m.openRefusals, m.leasesReused, m.interrupted, gen, open, cached, fromDev, unchecked, nodes, device)
	for _, k := range []string{"inode", "entry"} {
		m.inval.WithLabelValues(k)
	}
	for _, s := range []string{"device", "host", "inline"} {
		m.data.WithLabelValues(s)
	}
	for _, e := range []string{"stale", "busy"} {
		m.openRefusals.WithLabelValues(e)
	}
	return m
}

// Gatherer returns the client's metrics, for a promhttp handler.
func (c *Client) Gatherer() prometheus.Gatherer { return c.m.reg }
