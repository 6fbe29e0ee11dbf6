package vsockproto

import (
	"fmt"
	"strconv"
	"strings"
)

// Kinds of transport.
const (
	KindVsock  = "vsock"  // AF_VSOCK
	KindHybrid = "hvsock" // Firecracker/Cloud Hypervisor hybrid vsock
	// KindVMDir is a directory of VMs' hybrid-vsock sockets, each served
	// while it exists (listen only; the host agent watches the directory).
	KindVMDir = "hvsock-dir"
	KindUnix  = "unix" // a Unix stream socket
)

// AnyCID in Addr.CID: listen on every CID (VMADDR_CID_ANY).
const AnyCID = ^uint32(0)

// HostCID is the CID a guest dials to reach its host.
const HostCID = 2

// Addr is a parsed transport address (docs/protocol.md, "Transport").
type Addr struct {
	Kind string
	CID  uint32 // vsock; AnyCID for vsock:PORT
	Port uint32 // vsock and hvsock
	Path string // hvsock and unix
}

// ParseAddr parses vsock:PORT, vsock:CID:PORT, hvsock:PATH:PORT and
// unix:PATH. It is the only place addresses are parsed.
func ParseAddr(s string) (Addr, error) {
	kind, rest, ok := strings.Cut(s, ":")
	if !ok || rest == "" {
		return Addr{}, fmt.Errorf("address %q: want vsock:PORT, vsock:CID:PORT, hvsock:PATH:PORT, hvsock-dir:DIR:PORT or unix:PATH", s)
	}
	bad := func(format string, args ...any) (Addr, error) {
		return Addr{}, fmt.Errorf("address %q: "+format, append([]any{s}, args...)...)
	}
	switch kind {
	case KindVsock:
		a := Addr{Kind: kind, CID: AnyCID}
		cid, port, hasCID := strings.Cut(rest, ":")
		if !hasCID {
			port = cid
		} else {
			n, err := parseU32(cid)
			if err != nil || n == AnyCID {
				return bad("bad CID %q", cid)
			}
			a.CID = n
		}
		n, err := parseU32(port)
		if err != nil {
			return bad("bad port %q", port)
		}
		a.Port = n
		return a, nil
	case KindHybrid, KindVMDir:
		i := strings.LastIndexByte(rest, ':')
		if i <= 0 {
			return bad("want %s:PATH:PORT", kind)
		}
		n, err := parseU32(rest[i+1:])
		if err != nil {
			return bad("bad port %q", rest[i+1:])
		}
		return Addr{Kind: kind, Path: rest[:i], Port: n}, nil
	case KindUnix:
		return Addr{Kind: kind, Path: rest}, nil
	}
	return bad("unknown transport %q", kind)
}

func parseU32(s string) (uint32, error) {
	if s == "" || strings.TrimLeft(s, "0123456789") != "" {
		return 0, fmt.Errorf("not a decimal number")
	}
	n, err := strconv.ParseUint(s, 10, 32)
	return uint32(n), err
}

func (a Addr) String() string {
	switch a.Kind {
	case KindVsock:
		if a.CID == AnyCID {
			return fmt.Sprintf("vsock:%d", a.Port)
		}
		return fmt.Sprintf("vsock:%d:%d", a.CID, a.Port)
	case KindHybrid, KindVMDir:
		return fmt.Sprintf("%s:%s:%d", a.Kind, a.Path, a.Port)
	case KindUnix:
		return "unix:" + a.Path
	}
	return "invalid address"
}
