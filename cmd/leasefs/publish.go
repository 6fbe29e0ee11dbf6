package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/vsockproto"
)

// parseControl parses the arguments of a command that talks to the host
// agent, adding --control to fs's flags, and returns the control address.
func parseControl(fs *flag.FlagSet, args []string, stderr io.Writer) (vsockproto.Addr, error) {
	control := fs.String("control", defaultControl, "the host agent's control socket, unix:PATH")
	if err := parseFlags(fs, args, stderr); err != nil {
		return vsockproto.Addr{}, err
	}
	return vsockproto.ParseAddr(*control)
}

func runPublish(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("publish", `Usage: leasefs publish [--control unix:PATH] [--json] [--label REV [--force]] NAME

Publishes a generation of export NAME now: the host agent syncs the
filesystem, freezes it for a few milliseconds to record its metadata,
thaws it and tells the guests, which move to it as their --follow says.
Run it after a batch of writes (a mirror sync), with the agent's
--auto-publish off for exact control. Prints the generation's number,
its freeze time and how many inodes changed; --json prints those and
the time of each step (sync and checkpoint, the early capture of a full
scan, FIFREEZE, the scan, FITHAW, the merge after the thaw).

--label records the upstream revision the tree now holds (a mirror's
serial, a date, a version) with the generation: status, metrics and the
guests' status show it. Labels compare as versions (9 < 10), and one
that sorts before the export's last label is refused unless --force
(a deliberate rollback).

`)
	asJSON := fs.Bool("json", false, "print JSON, with each step's time")
	label := fs.String("label", "", "the upstream revision the generation holds")
	force := fs.Bool("force", false, "publish a --label that sorts before the last one")
	addr, err := parseControl(fs, args, stderr)
	if err != nil {
		return err
	}
	if fs.NArg() != 1 {
		fmt.Fprintln(stderr, "leasefs publish: name one export")
		return errUsage
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	p, _, err := hostagent.Control(ctx, addr, hostagent.ControlRequest{Op: "publish", Export: fs.Arg(0), Label: *label, Force: *force})
	if err != nil {
		return fmt.Errorf("publish %s: %w", fs.Arg(0), err)
	}
	if *asJSON {
		return writeJSON(stdout, p)
	}
	labeled := ""
	if p.Label != "" {
		labeled = " (" + p.Label + ")"
	}
	_, err = fmt.Fprintf(stdout, "%s: generation %d%s, freeze %.1f ms, %d inodes changed\n", p.Export, p.Generation, labeled, p.FreezeMS, p.ChangedInodes)
	return err
}

func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("status", `Usage: leasefs status [--control unix:PATH] [--json] [--leases [EXPORT]]

Shows each export of a host agent: its generation, when it was published
and how long its freeze took, its guests (and which are behind), the
leases they hold and the lease breaks so far (pending ones wait for a
guest's ack; revoked ones missed the --ack-timeout). --leases lists
every lease (of EXPORT, or of all): which guest holds which file, since
when and from which generation, and the breaks waiting for a guest's
acknowledgement, with their age. --json prints the same for scripts.

`)
	asJSON := fs.Bool("json", false, "print JSON")
	leases := fs.Bool("leases", false, "list every lease, and pending breaks")
	addr, err := parseControl(fs, args, stderr)
	if err != nil {
		return err
	}
	if fs.NArg() > 1 || fs.NArg() == 1 && !*leases {
		fs.Usage()
		return errUsage
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, st, err := hostagent.Control(ctx, addr, hostagent.ControlRequest{Op: "status", Leases: *leases, Export: fs.Arg(0)})
	if err != nil {
		return err
	}
	if *asJSON {
		return writeJSON(stdout, st)
	}
	if *leases {
		return writeLeases(stdout, st, time.Now())
	}
	return writeStatus(stdout, st, time.Now())
}

// writeLeases lists every lease: guest, path, generation, held for how
// long, and a pending break's age.
func writeLeases(w io.Writer, st *hostagent.Status, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "EXPORT\tGUEST\tPATH\tGEN\tHELD FOR\tBREAK PENDING")
	for _, e := range st.Exports {
		for _, l := range e.LeaseList {
			path, pending := l.Path, "-"
			if path == "" {
				path = fmt.Sprintf("(inode %d)", l.Inode)
			}
			if l.BreakSince != nil {
				pending = now.Sub(*l.BreakSince).Round(time.Millisecond).String()
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\n", e.Name, l.Guest, path, l.Generation,
				now.Sub(l.Since).Round(time.Second), pending)
		}
	}
	return tw.Flush()
}

// writeStatus shows st at a glance: a line per export, then its guests,
// with what needs attention (guests behind, breaks pending) said so.
func writeStatus(w io.Writer, st *hostagent.Status, now time.Time) error {
	if st.Version != "" {
		// Which binary answers, since when: an upgrade in place begins
		// another run in the same process.
		fmt.Fprintf(w, "agent %s, running %s\n\n", st.Version, now.Sub(st.Started).Round(time.Second))
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "EXPORT\tGEN\tLABEL\tPUBLISHED\tFREEZE\tGUESTS\tLEASES\tFILES\tBREAKS\tMOUNT")
	for _, e := range st.Exports {
		published := "-"
		if !e.Published.IsZero() {
			published = now.Sub(e.Published).Round(time.Second).String() + " ago"
		}
		breaks := fmt.Sprintf("%d", e.Breaks)
		if e.PendingBreaks > 0 || e.Revoked > 0 {
			breaks += fmt.Sprintf(" (%d pending, %d revoked)", e.PendingBreaks, e.Revoked)
		}
		label := e.Label
		if label == "" {
			label = "-"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%.1f ms\t%d\t%d\t%d\t%s\t%s\n", e.Name, e.Generation, label, published, e.LastFreezeMS,
			len(e.Guests), e.Leases, e.Files, breaks, e.Mount)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, l := range st.Lost {
		fmt.Fprintf(w, "\nexport %s LOST %s ago, not served: %s\n  (mount it again at %s and 'systemctl reload leasefs-host', or remove it from the settings)\n",
			l.Name, now.Sub(l.Since).Round(time.Second), l.Reason, l.Mount)
	}
	for _, e := range st.Exports {
		if len(e.KeptList) > 1 {
			var ks []string
			for _, k := range e.KeptList {
				s := fmt.Sprint(k.Number)
				switch {
				case k.Label != "" && k.Pinned > 0:
					s += fmt.Sprintf(" (%s, pinned by %d)", k.Label, k.Pinned)
				case k.Label != "":
					s += " (" + k.Label + ")"
				case k.Pinned > 0:
					s += fmt.Sprintf(" (pinned by %d)", k.Pinned)
				}
				ks = append(ks, s)
			}
			fmt.Fprintf(w, "\n%s keeps generations %s\n", e.Name, strings.Join(ks, ", "))
		}
	}
	for _, e := range st.Exports {
		if len(e.Guests) == 0 {
			continue
		}
		fmt.Fprintf(w, "\nguests of %s:\n", e.Name)
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "  GUEST\tGEN\tLEASES")
		for _, g := range e.Guests {
			behind := ""
			if g.Generation < e.Generation {
				behind = fmt.Sprintf(" (%d behind)", e.Generation-g.Generation)
			}
			if g.Pinned {
				behind += " pinned"
			}
			fmt.Fprintf(tw, "  %s\t%d%s\t%d\n", g.Peer, g.Generation, behind, g.Leases)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	return nil
}

// writeJSON prints v as indented JSON.
func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func runListen(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("listen", `Usage: leasefs listen [--control unix:PATH] [--add ADDR | --remove ADDR]

Adds or removes an address the running host agent serves guests on, and
prints those it serves: for a host whose VMs come with their own
listeners (a QEMU VM's vsock:CID:PORT, a Firecracker VM's
hvsock:PATH:PORT), started and stopped with the VM. Nothing else is
touched: the other guests, their sessions and leases. An address added
this way stays across reloads; one removed that is in the settings file
comes back at the next reload.

`)
	add := fs.String("add", "", "start serving guests on ADDR")
	remove := fs.String("remove", "", "stop serving ADDR (its connected guests stay)")
	addr, err := parseControl(fs, args, stderr)
	if err != nil {
		return err
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return errUsage
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	addrs, err := hostagent.ControlListen(ctx, addr, *add, *remove)
	if err != nil {
		return err
	}
	for _, a := range addrs {
		fmt.Fprintln(stdout, a)
	}
	return nil
}
