package main

import (
	"context"
	"fmt"
	"io"
	"strings"
)

// mount(8) runs /sbin/mount.fuse.leasefs for 'mount -t fuse.leasefs' and
// fstab lines of that type, as
//
//	mount.fuse.leasefs SOURCE DIR [-sfnv] [-o OPTIONS] [-t TYPE]
//
// With a connect= option SOURCE is an export name, mounted as by
// 'leasefs guest'; without one it is an ext4 image or device, mounted as
// by 'leasefs mount --image'. Options that are mount(8)'s or systemd's
// own are ignored, rw too (mount(8) adds it): the mount is read-only
// whatever they say.

// helperOptions maps each mount option to the flag it stands for.
var helperOptions = map[string]map[string]string{
	"guest": {"connect": "--connect", "device": "--device", "follow": "--follow", "down": "--down", "log": "--log", "log-level": "--log-level",
		"cache-mb": "--cache-mb", "page-cache": "--page-cache", "metrics": "--metrics", "status-socket": "--status-socket",
		"retry": "--retry", "storage-daemon": "--storage-daemon", "lease-linger": "--lease-linger", "generation": "--generation", "label": "--label",
		"show-generations": "--show-generations"},
	"mount": {"cache-mb": "--cache-mb", "readahead-kb": "--readahead-kb", "log": "--log", "allow-dirty-journal": "--allow-dirty-journal"},
}

// ignoredOption reports whether o is a generic option with no meaning
// to leasefs, or one every leasefs mount has anyway.
func ignoredOption(o string) bool {
	switch o {
	case "ro", "rw", "defaults", "auto", "noauto", "user", "nouser", "users", "nofail", "_netdev", "owner",
		"nosuid", "nodev", "noexec", "suid", "dev", "exec", "atime", "noatime", "relatime", "norelatime",
		"strictatime", "nodiratime", "async", "sync", "silent", "loud":
		return true
	}
	return strings.HasPrefix(o, "x-") || strings.HasPrefix(o, "comment=")
}

// mountHelperArgs turns mount(8)'s arguments into a leasefs subcommand
// and its arguments. fake is -f: check, do not mount.
func mountHelperArgs(args []string) (cmd string, out []string, fake bool, err error) {
	var pos, opts []string
	sloppy := false
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "-o" || a == "-t" || a == "-N":
			if i+1 == len(args) {
				return "", nil, false, fmt.Errorf("%s needs a value", a)
			}
			i++
			switch a {
			case "-o":
				opts = append(opts, strings.Split(args[i], ",")...)
			case "-N":
				return "", nil, false, fmt.Errorf("-N (mount namespaces) is not supported")
			}
		case strings.HasPrefix(a, "-o"):
			opts = append(opts, strings.Split(a[2:], ",")...)
		case strings.HasPrefix(a, "-") && len(a) > 1:
			for _, f := range a[1:] {
				switch f {
				case 's':
					sloppy = true
				case 'f':
					fake = true
				case 'n', 'v':
				default:
					return "", nil, false, fmt.Errorf("unknown flag -%c", f)
				}
			}
		default:
			pos = append(pos, a)
		}
	}
	if len(pos) != 2 {
		return "", nil, false, fmt.Errorf("want SOURCE DIR [-o OPTIONS], got %q", args)
	}
	source, dir := pos[0], pos[1]
	cmd = "mount"
	for _, o := range opts {
		if strings.HasPrefix(o, "connect=") {
			cmd = "guest"
		}
	}
	for _, o := range opts {
		k, v, hasValue := strings.Cut(o, "=")
		switch {
		case o == "":
		case helperOptions[cmd][k] != "":
			if hasValue {
				out = append(out, helperOptions[cmd][k]+"="+v)
			} else {
				out = append(out, helperOptions[cmd][k])
			}
		case ignoredOption(o) || sloppy:
		case helperOptions["guest"][k] != "":
			return "", nil, false, fmt.Errorf("option %s needs connect=ADDR (a guest mount of an export)", k)
		default:
			return "", nil, false, fmt.Errorf("unknown option %q (a guest mount takes connect=, device=, follow=, down=, log=, metrics=; an image mount cache-mb=, readahead-kb=, log=, allow-dirty-journal)", o)
		}
	}
	if cmd == "guest" {
		out = append(out, "--export="+source, dir)
	} else {
		out = append(out, "--image="+source, dir)
	}
	return cmd, out, fake, nil
}

func runMountHelper(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cmd, out, fake, err := mountHelperArgs(args)
	if err != nil {
		return fmt.Errorf("mount.fuse.leasefs: %w", err)
	}
	if fake {
		_, err := fmt.Fprintf(stdout, "leasefs %s %s\n", cmd, strings.Join(out, " "))
		return err
	}
	if cmd == "guest" {
		return runGuest(ctx, out, stdout, stderr)
	}
	return runMount(ctx, out, stdout, stderr)
}
