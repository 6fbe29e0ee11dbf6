package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/vsockproto"
)

// metricsListener listens where --metrics says: a loopback HOST:PORT or
// unix:PATH. Metrics are for the machine's own scraper or a local
// forwarder; a guest could reach a host's non-loopback address.
func metricsListener(spec string) (net.Listener, error) {
	if strings.HasPrefix(spec, "unix:") {
		a, err := vsockproto.ParseAddr(spec)
		if err != nil {
			return nil, err
		}
		l, err := vsockproto.Listen(a, vsockproto.ListenOptions{Mode: 0o600})
		if err != nil {
			return nil, err
		}
		return l.NetListener(), nil
	}
	host, _, err := net.SplitHostPort(spec)
	if err != nil {
		return nil, fmt.Errorf("--metrics %q: want a loopback HOST:PORT (127.0.0.1:9464) or unix:PATH", spec)
	}
	ip := net.ParseIP(host)
	if host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return nil, fmt.Errorf("--metrics %q: metrics are served on loopback only (127.0.0.1, ::1, localhost); scrape them there or through a local forwarder", spec)
	}
	return net.Listen("tcp", spec)
}

// serveMetrics serves g at /metrics on l until ctx ends.
func serveMetrics(ctx context.Context, l net.Listener, g prometheus.Gatherer, log hclog.Logger) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	stop := context.AfterFunc(ctx, func() { srv.Close() })
	defer stop()
	log.Info("serving metrics", "addr", l.Addr().String())
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func runMetrics(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("metrics", `Usage: leasefs metrics [--control unix:PATH]

Prints the host agent's metrics in the Prometheus text format, fetched
through its control socket: for a textfile collector, or a look by hand.
A host or guest started with --metrics HOST:PORT also serves them over
HTTP at /metrics.

`)
	addr, err := parseControl(fs, args, stderr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	text, err := hostagent.ControlMetrics(ctx, addr)
	if err != nil {
		return err
	}
	_, err = io.WriteString(stdout, text)
	return err
}
