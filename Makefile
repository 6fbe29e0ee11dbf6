# leasefs — see README.md.
GO       ?= go
VERSION  ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -X main.version=$(VERSION)
BIN      := bin/leasefs
STATICCHECK_VERSION := v0.8.2
FUZZTIME ?= 10s

.PHONY: all build test test-vm lint fuzz bench bench-live bench-publish bench-keep bench-usr bench-usr-memory bench-lease demo deps clean install uninstall

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/leasefs

deps:
	@scripts/deps.sh test

# All tests. Privileged ones (FUSE, loop mounts) need root; under CI=true a
# test that cannot run its privileged part fails instead of skipping. Then
# the host agent's tests again with the lock-rank checker
# (internal/lockrank), which panics at a lock taken out of its order, and
# the invariant checks: the lease coordinator's maps and counters at every
# unlock, the block store's references after every publish, the guest
# switcher's state after every change to it.
test: deps
	$(GO) test -race -count=1 -timeout 30m ./...
	$(GO) test -tags lockrank,invariants -count=1 -timeout 10m ./internal/lockrank ./lease ./hostagent/... ./guestagent

# The end-to-end scenarios in QEMU VMs on the guest kernels 5.10, 6.1 and
# 6.12 (also part of 'make test'): host agent and guest inside each VM
# (TestGuestKernels), and the host agent here with guests in four VMs at
# once over vhost-user vsock (TestFleet). Fetches the kernels and
# vhost-device-vsock once, into /var/cache/leasefs-vm;
# LEASEFS_VM_KERNELS=6.1 boots only that kernel.
test-vm: deps
	$(GO) test -count=1 -timeout 30m -run 'TestGuestKernels|TestFleet|TestSystemd|TestBootUsr' -v ./internal/vmtest

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet ./...
	$(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
	"$$($(GO) env GOPATH)/bin/staticcheck" ./...

# Each fuzz target for FUZZTIME (go test allows one target per run).
FUZZPKGS := ./ext4ro ./vsockproto ./lease ./hostagent/upgrade
fuzz:
	@for p in $(FUZZPKGS); do for t in $$($(GO) test -list '^Fuzz' $$p | grep ^Fuzz); do \
		echo "== $$p $$t"; $(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 5s $$p || exit 1; done; done

bench: build
	@scripts/deps.sh bench
	bench/run.sh

# The live guest against the host's kernel mount: walks, guest memory.
# LEASEFS_BEFORE=path/to/another/build measures it too, side by side.
bench-live: build
	@scripts/deps.sh bench
	bench/live.sh

# Freeze length by number of changed files, its phases, host agent RSS
# (root and loop devices). LEASEFS_BEFORE=another/build runs it side by side.
bench-publish: build
	@scripts/deps.sh bench
	bench/publish.sh

# What keeping generations whole costs: kernel memory pinned per held
# file (the agent keeping and not, alternating), and publishes with and
# without the keeper.
bench-keep: build
	@scripts/deps.sh bench
	bench/keep.sh
	$(GO) test -run '^$$' -bench Keep -benchtime 5x -count 3 ./hostagent

# Program starts (python3 imports, perl, git, a shell script of
# coreutils) from a leasefs /usr against the host's ext4, warm,
# interleaved (the Debian /usr is built once with mmdebstrap).
bench-usr: build
	@scripts/deps.sh test
	bench/usr.sh

# Lease acquisition latency and memory per lease.
# What 4 VMs running the same python workload from a leasefs /usr cost
# the host in memory, per page-cache mode (QEMU TCG; several minutes).
bench-usr-memory: deps
	$(GO) test -run '^$$' -bench UsrMemory -benchtime 1x -timeout 60m -v ./internal/vmtest

bench-lease: deps
	$(GO) test -run '^$$' -bench Acquire -benchtime 20000x -count 5 ./lease
	$(GO) test -run '^$$' -bench MemoryPerLease -benchtime 1x -count 2 ./lease

demo: build
	@scripts/deps.sh demo
	examples/demo/demo.sh

clean:
	rm -rf bin

# The binary, mount(8)'s helper (mount -t fuse.leasefs) and the systemd
# units, under PREFIX (/usr/local; units in PREFIX/lib/systemd/system,
# where systemd looks), DESTDIR for packaging. 'make uninstall' removes
# what this installs.
PREFIX ?= /usr/local
UNITDIR ?= $(PREFIX)/lib/systemd/system
install: build
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/leasefs
	install -d $(DESTDIR)/sbin $(DESTDIR)$(UNITDIR) $(DESTDIR)/etc/leasefs
	ln -sf $(PREFIX)/bin/leasefs $(DESTDIR)/sbin/mount.fuse.leasefs
	for u in leasefs-host.service leasefs-guest@.service; do \
		sed 's#/usr/local/bin/leasefs#$(PREFIX)/bin/leasefs#g' examples/systemd/$$u > $(DESTDIR)$(UNITDIR)/$$u || exit 1; done
	@echo "installed; put your exports in /etc/leasefs/host.toml (examples/systemd/host.toml), a guest's in guest-NAME.conf; then systemctl daemon-reload"

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/leasefs $(DESTDIR)/sbin/mount.fuse.leasefs \
		$(DESTDIR)$(UNITDIR)/leasefs-host.service $(DESTDIR)$(UNITDIR)/leasefs-guest@.service
	@echo "uninstalled; /etc/leasefs and /var/lib/leasefs are left as they are"
