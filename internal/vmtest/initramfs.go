package vmtest

import (
	"bufio"
	"bytes"
	"debug/elf"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// An Initramfs is the files of a VM's root, written as the kernel
// unpacks it: a "newc" cpio archive (Documentation/driver-api/early-userspace).
type Initramfs struct {
	w    *bufio.Writer
	ino  uint32
	dirs map[string]bool
	err  error
}

// NewInitramfs writes an archive to w; Close ends it.
func NewInitramfs(w io.Writer) *Initramfs {
	return &Initramfs{w: bufio.NewWriter(w), ino: 1, dirs: map[string]bool{"": true}}
}

// entry writes one header, name and body, each padded to 4 bytes.
func (a *Initramfs) entry(name string, mode uint32, body []byte) {
	if a.err != nil {
		return
	}
	a.ino++
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		a.ino, mode, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(name)+1, 0)
	pad := func(n int) []byte { return make([]byte, (4-n%4)%4) }
	for _, b := range [][]byte{[]byte(hdr), []byte(name), {0}, pad(len(hdr) + len(name) + 1), body, pad(len(body))} {
		if _, err := a.w.Write(b); err != nil {
			a.err = err
			return
		}
	}
}

// parents makes the directories above name.
func (a *Initramfs) parents(name string) {
	dir := filepath.Dir(name)
	if dir == "." || a.dirs[dir] {
		return
	}
	a.parents(dir)
	a.dirs[dir] = true
	a.entry(dir, 0o040755, nil)
}

// Dir adds an empty directory.
func (a *Initramfs) Dir(name string) {
	a.parents(name + "/x")
}

// File adds a regular file with the permission bits perm.
func (a *Initramfs) File(name string, perm uint32, body []byte) {
	a.parents(name)
	a.entry(name, 0o100000|perm, body)
}

// Copy adds the file at src as name.
func (a *Initramfs) Copy(name, src string, perm uint32) {
	b, err := os.ReadFile(src)
	if err != nil && a.err == nil {
		a.err = err
	}
	a.File(name, perm, b)
}

// Symlink adds name pointing at target.
func (a *Initramfs) Symlink(name, target string) {
	a.parents(name)
	a.entry(name, 0o120777, []byte(target))
}

// Close writes the trailer.
func (a *Initramfs) Close() error {
	a.entry("TRAILER!!!", 0, nil)
	if a.err != nil {
		return a.err
	}
	return a.w.Flush()
}

// Modules returns the module files under modDir (a kernel's
// lib/modules/VERSION) that load the named modules, each after what it
// depends on; modules built into the kernel are left out. The
// dependencies come from each module's .modinfo (modules.dep is made
// by depmod at install, and packages do not carry it).
func Modules(modDir string, names ...string) ([]string, error) {
	files := map[string]string{} // module name → path
	err := filepath.WalkDir(modDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if n, ok := strings.CutSuffix(d.Name(), ".ko"); ok && !d.IsDir() {
			files[modName(n)] = path
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	builtin := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(modDir, "modules.builtin")); err == nil {
		for _, line := range strings.Fields(string(b)) {
			builtin[modName(strings.TrimSuffix(filepath.Base(line), ".ko"))] = true
		}
	}
	var order []string
	seen := map[string]bool{}
	var visit func(name string, from []string) error
	visit = func(name string, from []string) error {
		name = modName(name)
		if seen[name] {
			return nil
		}
		seen[name] = true
		path, ok := files[name]
		if !ok {
			if builtin[name] {
				return nil
			}
			return fmt.Errorf("module %s (wanted by %v) is neither a module nor built into the kernel", name, from)
		}
		deps, err := moduleDepends(path)
		if err != nil {
			return err
		}
		for _, d := range deps {
			if err := visit(d, append(from, name)); err != nil {
				return err
			}
		}
		order = append(order, path)
		return nil
	}
	sort.Strings(names)
	for _, n := range names {
		if err := visit(n, nil); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// modName is a module's name as the kernel spells it.
func modName(s string) string { return strings.ReplaceAll(s, "-", "_") }

// moduleDepends reads "depends=" from a module's .modinfo section.
func moduleDepends(path string) ([]string, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("%s: no .modinfo", path)
	}
	b, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	for _, kv := range bytes.Split(b, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok && len(v) > 0 {
			return strings.Split(string(v), ","), nil
		}
	}
	return nil, nil
}
