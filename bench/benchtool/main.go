// Command benchtool is the workload half of bench/run.sh: small, exact
// file-system workloads whose time hyperfine measures.
//
//	benchtool walk DIR            lstat every entry below DIR
//	benchtool stat DIR N SEED     lstat N random names f0000000… in DIR
//	benchtool randread FILE N SEED  N random 4 KiB preads
//	benchtool mkdir-many DIR N    create N empty files f0000000… (setup)
//	benchtool peakrss PID         print the peak RSS of PID in MiB
//	benchtool visible NAME DIR... wait until NAME is in every DIR; print the ms it took
package main

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "benchtool:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) < 2 {
		return fmt.Errorf("usage: benchtool walk|stat|randread|mkdir-many|peakrss ARGS")
	}
	num := func(i int) int {
		if i >= len(args) {
			return 0
		}
		n, _ := strconv.Atoi(args[i])
		return n
	}
	switch args[0] {
	case "walk":
		n, err := walk(args[1])
		fmt.Fprintf(os.Stderr, "%d entries\n", n)
		return err
	case "stat":
		rng := rand.New(rand.NewPCG(uint64(num(3)), 1))
		total := num(2)
		if total == 0 {
			return fmt.Errorf("stat needs N")
		}
		names, err := countNames(args[1])
		if err != nil {
			return err
		}
		for range total {
			if _, err := os.Lstat(filepath.Join(args[1], name(rng.IntN(names)))); err != nil {
				return err
			}
		}
		return nil
	case "randread":
		f, err := os.Open(args[1])
		if err != nil {
			return err
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return err
		}
		rng := rand.New(rand.NewPCG(uint64(num(3)), 2))
		buf := make([]byte, 4096)
		blocks := st.Size() / 4096
		for range num(2) {
			if _, err := f.ReadAt(buf, rng.Int64N(blocks)*4096); err != nil {
				return err
			}
		}
		return nil
	case "mkdir-many":
		if err := os.MkdirAll(args[1], 0o755); err != nil {
			return err
		}
		for i := range num(2) {
			if err := os.WriteFile(filepath.Join(args[1], name(i)), nil, 0o644); err != nil {
				return err
			}
		}
		return os.WriteFile(filepath.Join(args[1], ".count"), []byte(strconv.Itoa(num(2))), 0o644)
	case "peakrss":
		return peakRSS(args[1])
	case "visible":
		return visible(args[1], args[2:])
	}
	return fmt.Errorf("unknown workload %q", args[0])
}

func name(i int) string { return fmt.Sprintf("f%07d", i) }

// countNames reads how many names mkdir-many made (without listing the
// directory, which would warm the caches being measured).
func countNames(dir string) (int, error) {
	b, err := os.ReadFile(filepath.Join(dir, ".count"))
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

// walk lstats every entry below root, directories first, as find does.
func walk(root string) (int, error) {
	n := 0
	var visit func(dir string) error
	visit = func(dir string) error {
		ents, err := os.ReadDir(dir)
		if err != nil {
			return err
		}
		for _, e := range ents {
			p := filepath.Join(dir, e.Name())
			st, err := os.Lstat(p)
			if err != nil {
				return err
			}
			n++
			if st.IsDir() {
				if err := visit(p); err != nil {
					return err
				}
			}
		}
		return nil
	}
	return n, visit(root)
}

func peakRSS(pid string) error {
	f, err := os.Open(filepath.Join("/proc", pid, "status"))
	if err != nil {
		return err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "VmHWM:"); ok {
			kb, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			if err != nil {
				return err
			}
			fmt.Printf("%.1f\n", float64(kb)/1024)
			return nil
		}
	}
	return fmt.Errorf("no VmHWM for pid %s", pid)
}

// visible polls each dir until name is in it, and prints how long it took
// until the last one had it.
func visible(name string, dirs []string) error {
	start := time.Now()
	left := dirs
	for len(left) > 0 {
		var still []string
		for _, d := range left {
			if _, err := os.Lstat(filepath.Join(d, name)); err != nil {
				still = append(still, d)
			}
		}
		left = still
		if time.Since(start) > time.Minute {
			return fmt.Errorf("%s not visible in %d of %d mounts after a minute", name, len(left), len(dirs))
		}
		if len(left) > 0 {
			time.Sleep(100 * time.Microsecond)
		}
	}
	fmt.Printf("%.2f\n", float64(time.Since(start).Microseconds())/1000)
	return nil
}
