package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/vsockproto"
)

func controlAddr(fs *flag.FlagSet, s string, stderr io.Writer) (vsockproto.Addr, error) {
	if s == "" {
		fmt.Fprintf(stderr, "leasefs %s: need --control unix:PATH\n", fs.Name())
		fs.Usage()
		return vsockproto.Addr{}, errUsage
	}
	return vsockproto.ParseAddr(s)
}

func runPublish(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("publish", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "Usage: leasefs publish --control unix:PATH NAME\n\nPublishes a generation of export NAME now and prints its number and freeze time.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	control := fs.String("control", "", "the host agent's control socket, unix:PATH")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	addr, err := controlAddr(fs, *control, stderr)
	if err != nil {
		return err
	}
	if fs.NArg() != 1 {
		fmt.Fprintln(stderr, "leasefs publish: name one export")
		return errUsage
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	p, _, err := hostagent.Control(ctx, addr, hostagent.ControlRequest{Op: "publish", Export: fs.Arg(0)})
	if err != nil {
		return fmt.Errorf("publish %s: %w", fs.Arg(0), err)
	}
	_, err = fmt.Fprintf(stdout, "%s: generation %d, freeze %.1f ms, %d inodes changed\n", p.Export, p.Generation, p.FreezeMS, p.ChangedInodes)
	return err
}

func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "Usage: leasefs status --control unix:PATH [--json]\n\nShows the exports, their generations, guests, leases and pending breaks.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	control := fs.String("control", "", "the host agent's control socket, unix:PATH")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	addr, err := controlAddr(fs, *control, stderr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, st, err := hostagent.Control(ctx, addr, hostagent.ControlRequest{Op: "status"})
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	for _, e := range st.Exports {
		fmt.Fprintf(stdout, "export %s (%s): generation %d, last freeze %.1f ms, %d metadata blocks\n",
			e.Name, e.Mount, e.Generation, e.LastFreezeMS, e.Blocks)
		fmt.Fprintf(stdout, "  leases %d on %d files, %d breaks pending; %d breaks, %d revoked\n",
			e.Leases, e.Files, e.PendingBreaks, e.Breaks, e.Revoked)
		for _, g := range e.Guests {
			fmt.Fprintf(stdout, "  guest %s: generation %d, %d leases\n", g.Peer, g.Generation, g.Leases)
		}
	}
	return nil
}
