package guestagent

import (
	"errors"
	"io"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/time/rate"

	"github.com/leasefs/leasefs/ext4ro"
)

// FileSystem is a read-only FUSE filesystem over an ext4ro view. It uses
// go-fuse's raw API: the FUSE node id of an inode is its ext4 inode number
// (the root, ext4 inode 2, is FUSE's node 1), so the filesystem keeps no
// per-inode state and any inode can be resolved straight from the image.
// The kernel caches entries, attributes, listings and pages for as long as
// Timeout says; whoever changes the view must invalidate what changed.
type FileSystem struct {
	fuse.RawFileSystem // ENOSYS for whatever is not implemented below

	views     *recentViews // the view served, and those served lately (views.go)
	timeout   time.Duration
	noOpen    bool
	noOpenDir bool
	directIO  bool
	log       hclog.Logger
	errLog    *rate.Limiter // of error log lines
	warnLog   *rate.Limiter // of lines about refused opens

	files Files  // nil: files are read straight from the view
	nodes *nodes // what the kernel holds; nil for a view that never changes

	gens     Generations // serves .generations (browse.go); nil: none
	showGens bool        // .generations is in the root's listing
	browsed  browsed
	started  time.Time

	mu      sync.Mutex
	handles map[uint64]*handle   // open files and directories; guarded by mu
	held    map[uint64][]*handle // open files with a reader (Files), by node; guarded by mu
	nextFh  uint64               // guarded by mu
}

// handle is an open file or directory: the view it was opened in, so a
// listing stays in one generation, and for a file its reader.
type handle struct {
	v    *ext4ro.FS
	in   *ext4ro.Inode
	node uint64
	f    *sharedFile // nil: read from the view
}

// sharedFile is a reader shared by the opens of one version of a file:
// one of them by name, the others through a file it holds open
// (/proc/PID/fd/N) after the view served lost that version. It is
// closed with its last handle.
type sharedFile struct {
	OpenFile
	refs int // guarded by FileSystem.mu
}

// Staler is an OpenFile that can say it may no longer be read. Stale is
// called with FileSystem.mu held: it takes no lock.
type Staler interface {
	Stale() error
}

// Files opens regular files of a live view (the guest's): an open takes
// a lease, the reader reads the file as it was opened, and Close releases.
// fixed says v is a kept generation browsed in .generations: the open is
// of that generation's file or fails, never moved to another.
type Files interface {
	Open(cancel <-chan struct{}, v *ext4ro.FS, in *ext4ro.Inode, fixed bool) (OpenFile, error)
}

// OpenFile reads one open file.
type OpenFile interface {
	ReadAt(p []byte, off int64) (int, error)
	Close() error
}

// Interruptible is an OpenFile whose reads may wait (for the host), and
// end when the kernel says the application was interrupted: cancel is
// the FUSE request's, closed then (Files.Open takes it too).
type Interruptible interface {
	ReadAtOrCancel(cancel <-chan struct{}, p []byte, off int64) (int, error)
}

// Config configures a FileSystem.
type Config struct {
	// Timeout is how long the kernel may cache entries and attributes.
	Timeout time.Duration
	// NoOpen answers OPEN and OPENDIR with ENOSYS, after which the kernel
	// opens files and directories without asking, keeping their page and
	// listing caches: two round trips fewer per open. Only for a view
	// that never changes and needs no per-open state (a static image).
	NoOpen bool
	// NoOpenDir answers OPENDIR with ENOSYS, after which the kernel lists
	// directories without opening them (and without releasing them): two
	// round trips fewer per directory. A listing then stays in the view
	// it began in through its cookies, which carry the view's tag
	// (SetView): a view that changes may do it.
	NoOpenDir bool
	// DirectIO opens regular files for direct I/O: the kernel caches
	// none of their data, every read comes here (--page-cache=host).
	DirectIO bool
	// Files, if set, opens regular files (and NoOpen must be false).
	Files Files
	// Generations, if set, serves the .generations directory at the
	// root (browse.go), hidden from the root's listing unless
	// ShowGenerations. It needs NoOpenDir.
	Generations     Generations
	ShowGenerations bool
	Logger          hclog.Logger
}

// NewFileSystem serves view.
func NewFileSystem(view *ext4ro.FS, cfg Config) *FileSystem {
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	fs := &FileSystem{
		RawFileSystem: fuse.NewDefaultRawFileSystem(),
		timeout:       cfg.Timeout,
		noOpen:        cfg.NoOpen,
		noOpenDir:     cfg.NoOpen || cfg.NoOpenDir,
		directIO:      cfg.DirectIO,
		log:           cfg.Logger,
		errLog:        rate.NewLimiter(rate.Every(time.Second), 10),
		warnLog:       rate.NewLimiter(rate.Every(time.Second), 10),
		files:         cfg.Files,
		gens:          cfg.Generations,
		showGens:      cfg.ShowGenerations && cfg.Generations != nil,
		started:       time.Now(),
		handles:       make(map[uint64]*handle),
		held:          make(map[uint64][]*handle),
	}
	if cfg.Files != nil {
		fs.nodes = newNodes()
	}
	fs.views = newRecentViews(servedView{fs: view})
	return fs
}

// View returns the view being served.
func (fs *FileSystem) View() *ext4ro.FS { return fs.views.current().fs }

// SetView serves v from now on, tagged tag (a number that names it among
// the recent views), and returns the view it replaces. Open files and
// directories keep the view they were opened in, and a directory listing
// begun in an earlier view goes on in it while it is among the last few.
// The caller then invalidates what the kernel may have cached of the old
// view. (A live mount's switcher serves its generations with serve.)
func (fs *FileSystem) SetView(v *ext4ro.FS, tag uint32) *ext4ro.FS {
	return fs.serve(v, tag, nil)
}

// serve is SetView of the reader of generation gv.
func (fs *FileSystem) serve(v *ext4ro.FS, tag uint32, gv *genView) *ext4ro.FS {
	return fs.views.serve(servedView{tag: tag % maxTag, fs: v, gen: gv}).fs
}

// Directory cookies carry the tag of the view a listing began in, above
// the directory position (ext4ro's, under 2^40), keeping the sign bit
// clear: the kernel stores them as signed file positions.
const (
	cookieBits = 40
	maxTag     = 1<<(63-cookieBits) - 1
)

func tagCookie(tag uint32, pos uint64) uint64 { return uint64(tag)<<cookieBits | pos }

func splitCookie(c uint64) (tag uint32, pos uint64) {
	return uint32(c >> cookieBits), c & (1<<cookieBits - 1)
}

// viewTagged returns the recent view tagged tag, or (for tag 0, a new
// listing, or a view no longer recent) the current one.
func (fs *FileSystem) viewTagged(tag uint32) (uint32, *ext4ro.FS) {
	v := fs.views.tagged(tag)
	return v.tag, v.fs
}

// Nodes returns how many nodes the kernel holds, besides the root (0 for
// a view that never changes, which does not count them).
func (fs *FileSystem) Nodes() int {
	if fs.nodes == nil {
		return 0
	}
	return fs.nodes.len()
}

func (fs *FileSystem) String() string { return "leasefs" }

const fuseRoot = 1

// NodeID is the FUSE node id of an inode: a tag in the high 32 bits and
// its number in the low. For a regular file the tag is its Version, so a
// file changed in place between generations is another node, another
// kernel inode with its own attributes and page cache: pages of one
// version are never served to an open file of another. For anything else
// it is its i_generation, so a directory keeps its node (and the kernel
// its cached children) across changes. Either way an inode number the
// host reuses for another file is another node, and a name the kernel
// still caches for the old one can never reach the new (it gets ESTALE,
// and the kernel looks the name up again). The root is node 1. The tag
// keeps 31 bits: node ids with the top bit set are .generations's
// (browse.go).
func NodeID(in *ext4ro.Inode) uint64 {
	if in.Ino == ext4ro.RootIno {
		return fuseRoot
	}
	tag := in.Generation
	if in.IsRegular() {
		tag = in.Version()
	}
	return uint64(tag&^(1<<31))<<32 | uint64(in.Ino)
}

// nodeIno returns the inode number of a node id; 0 for one never
// handed out.
func nodeIno(id uint64) uint32 {
	switch {
	case id == fuseRoot:
		return ext4ro.RootIno
	case uint32(id) == ext4ro.RootIno:
		return 0 // never handed out
	}
	return uint32(id)
}

// status answers a request that failed with err (errnoOf), logging
// what means damage or failure: a burst of ten lines, then one a second.
func (fs *FileSystem) status(op string, err error) fuse.Status {
	if err == nil {
		return fuse.OK
	}
	errno, log := errnoOf(err)
	if log && fs.errLog.Allow() {
		fs.log.Error("request failed", "op", op, "errno", errno, "error", err)
	}
	return fuse.Status(errno)
}

// inode resolves nodeID in the view served, or, for a version of a file
// that view no longer has, in the view an open file of it was opened in:
// a file held open can be reached again (/proc/PID/fd/N, /proc/PID/exe)
// for as long as it is held.
func (fs *FileSystem) inode(nodeID uint64) (*ext4ro.FS, *ext4ro.Inode, fuse.Status) {
	v, in, st := fs.inodeIn(fs.View(), nodeID)
	if st == fuse.Status(syscall.ESTALE) {
		if h := fs.heldNode(nodeID); h != nil {
			return h.v, h.in, fuse.OK
		}
	}
	return v, in, st
}

// inodeIn resolves nodeID in view v (a browsed generation's node in its
// own).
func (fs *FileSystem) inodeIn(v *ext4ro.FS, nodeID uint64) (*ext4ro.FS, *ext4ro.Inode, fuse.Status) {
	if nodeID&browseBit != 0 {
		return fs.browseInode(nodeID)
	}
	ino := nodeIno(nodeID)
	if ino == 0 {
		return nil, nil, fuse.Status(syscall.ESTALE)
	}
	in, err := v.Inode(ino)
	if err != nil {
		if errors.Is(err, ext4ro.ErrNotExist) {
			return nil, nil, fuse.Status(syscall.ESTALE)
		}
		return nil, nil, fs.status("inode", err)
	}
	if nodeID != fuseRoot && NodeID(in) != nodeID {
		return nil, nil, fuse.Status(syscall.ESTALE) // the number now names another file, or another version
	}
	return v, in, fuse.OK
}

func (fs *FileSystem) fillAttr(v *ext4ro.FS, in *ext4ro.Inode, a *fuse.Attr) {
	*a = fuse.Attr{
		Ino:       uint64(in.Ino),
		Size:      in.Size,
		Blocks:    in.Blocks,
		Atime:     uint64(in.Atime.Sec),
		Atimensec: in.Atime.Nsec,
		Mtime:     uint64(in.Mtime.Sec),
		Mtimensec: in.Mtime.Nsec,
		Ctime:     uint64(in.Ctime.Sec),
		Ctimensec: in.Ctime.Nsec,
		Mode:      in.Mode,
		Nlink:     in.Nlink,
		Owner:     fuse.Owner{Uid: in.Uid, Gid: in.Gid},
		Rdev:      in.Rdev,
		Blksize:   uint32(v.BlockSize()),
	}
}

// fillEntry answers a lookup of name in directory parent with in: the
// kernel holds one more reference to its node from then on.
func (fs *FileSystem) fillEntry(v *ext4ro.FS, in *ext4ro.Inode, out *fuse.EntryOut, parent uint64, name string) {
	out.NodeId = fs.nodeID(v, in)
	if fs.nodes != nil {
		fs.nodes.add(out.NodeId, parent, name)
	}
	out.Generation = uint64(in.Generation)
	out.SetEntryTimeout(fs.timeout)
	out.SetAttrTimeout(fs.timeout)
	fs.fillAttr(v, in, &out.Attr)
}

func (fs *FileSystem) Lookup(_ <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	switch {
	case h.NodeId == genDirID:
		return fs.lookupGenerations(name, out)
	case synthetic(h.NodeId):
		return fuse.ENOTDIR
	case h.NodeId == fuseRoot && name == GenerationsDir && fs.gens != nil:
		out.NodeId = genDirID
		out.SetEntryTimeout(genDirTimeout)
		out.SetAttrTimeout(genDirTimeout)
		fs.syntheticAttr(genDirID, &out.Attr)
		if fs.nodes != nil {
			fs.nodes.add(genDirID, fuseRoot, name)
		}
		return fuse.OK
	}
	v, dir, st := fs.inode(h.NodeId)
	if !st.Ok() {
		return st
	}
	e, err := v.Lookup(dir, name)
	if err != nil {
		if errors.Is(err, ext4ro.ErrNotExist) {
			// A negative entry (node 0) lets the kernel cache the
			// miss; whoever changes the view invalidates it.
			*out = fuse.EntryOut{}
			out.SetEntryTimeout(fs.timeout)
			return fuse.OK
		}
		return fs.status("lookup", err)
	}
	in, err := v.Inode(e.Ino)
	if err != nil {
		return fs.status("lookup", err)
	}
	fs.fillEntry(v, in, out, h.NodeId, name)
	return fuse.OK
}

// Forget: the kernel dropped nlookup references to the node.
func (fs *FileSystem) Forget(nodeID, nlookup uint64) {
	if fs.nodes != nil {
		fs.nodes.forget(nodeID, nlookup)
	}
}

func (fs *FileSystem) GetAttr(_ <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	// On an open file, the attributes are those it was opened with: the
	// file may be gone from the current view, and still be read.
	if in.Flags()&fuse.FUSE_GETATTR_FH != 0 {
		if h := fs.handle(in.Fh()); h != nil {
			out.SetTimeout(fs.timeout)
			fs.fillAttr(h.v, h.in, &out.Attr)
			return fuse.OK
		}
	}
	if synthetic(in.NodeId) {
		out.SetTimeout(genDirTimeout)
		fs.syntheticAttr(in.NodeId, &out.Attr)
		return fuse.OK
	}
	v, ino, st := fs.inode(in.NodeId)
	if !st.Ok() {
		return st
	}
	out.SetTimeout(fs.timeout)
	fs.fillAttr(v, ino, &out.Attr)
	return fuse.OK
}

func (fs *FileSystem) Access(_ <-chan struct{}, in *fuse.AccessIn) fuse.Status {
	if in.Mask&unixW_OK != 0 {
		return fuse.EROFS
	}
	if synthetic(in.NodeId) {
		return fuse.OK
	}
	_, _, st := fs.inode(in.NodeId)
	return st
}

const unixW_OK = 2

func (fs *FileSystem) Readlink(_ <-chan struct{}, h *fuse.InHeader) ([]byte, fuse.Status) {
	if synthetic(h.NodeId) && h.NodeId != genDirID {
		return strconv.AppendUint(nil, h.NodeId&^(browseBit|labelBit), 10), fuse.OK
	}
	v, in, st := fs.inode(h.NodeId)
	if !st.Ok() {
		return nil, st
	}
	t, err := v.Readlink(in)
	return t, fs.status("readlink", err)
}

func (fs *FileSystem) addHandle(h *handle) uint64 {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	fs.nextFh++
	fs.handles[fs.nextFh] = h
	if h.f != nil {
		fs.held[h.node] = append(fs.held[h.node], h)
	}
	return fs.nextFh
}

// share returns a handle sharing the reader of an open file of node id
// that may still be read, with a reference taken on it; or nil.
func (fs *FileSystem) share(id uint64) *handle {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	h := fs.heldLocked(id)
	if h == nil {
		return nil
	}
	h.f.refs++
	return &handle{v: h.v, in: h.in, node: id, f: h.f}
}

// heldNode returns an open file of node id whose reader may still be
// read, or nil: where its version can be found.
func (fs *FileSystem) heldNode(id uint64) *handle {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return fs.heldLocked(id)
}

// heldLocked is heldNode, called with fs.mu held.
func (fs *FileSystem) heldLocked(id uint64) *handle {
	for _, h := range fs.held[id] {
		if s, ok := h.f.OpenFile.(Staler); !ok || s.Stale() == nil {
			return h
		}
	}
	return nil
}

// opened returns the inode of an open file or directory: from its handle,
// or, when the kernel opens without asking (NoOpen), from its node id.
func (fs *FileSystem) opened(nodeID, fh uint64) (*ext4ro.FS, *ext4ro.Inode, fuse.Status) {
	if fs.noOpen {
		return fs.inode(nodeID)
	}
	h := fs.handle(fh)
	if h == nil {
		return nil, nil, fuse.EBADF
	}
	return h.v, h.in, fuse.OK
}

func (fs *FileSystem) handle(fh uint64) *handle {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return fs.handles[fh]
}

func (fs *FileSystem) dropHandle(fh uint64) {
	fs.mu.Lock()
	h := fs.handles[fh]
	delete(fs.handles, fh)
	var last *sharedFile
	if h != nil && h.f != nil {
		hs := slices.DeleteFunc(fs.held[h.node], func(o *handle) bool { return o == h })
		if len(hs) == 0 {
			delete(fs.held, h.node)
		} else {
			fs.held[h.node] = hs
		}
		if h.f.refs--; h.f.refs == 0 {
			last = h.f
		}
	}
	fs.mu.Unlock()
	if last != nil {
		if err := last.Close(); err != nil {
			fs.log.Debug("closing a file", "inode", h.in.Ino, "error", err)
		}
	}
}

func (fs *FileSystem) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if in.Flags&syscall.O_ACCMODE != syscall.O_RDONLY || in.Flags&syscall.O_TRUNC != 0 {
		return fuse.EROFS
	}
	if fs.noOpen {
		return fuse.ENOSYS // the mount is read-only: writes never get here
	}
	if synthetic(in.NodeId) {
		return fuse.EISDIR
	}
	v, ino, st := fs.inode(in.NodeId)
	if !st.Ok() {
		return st
	}
	if ino.Encrypted() {
		return fs.status("open", ext4ro.ErrEncrypted)
	}
	h := &handle{v: v, in: ino, node: in.NodeId}
	if shared := fs.share(in.NodeId); shared != nil {
		// This version is open already (and, if the view served no
		// longer has it, can only be reached through that open file):
		// share its reader, as the kernel shares its pages.
		h = shared
	} else if fs.files != nil && ino.IsRegular() {
		f, err := fs.files.Open(cancel, v, ino, in.NodeId&browseBit != 0)
		if err != nil {
			if errors.Is(err, ErrStale) || errors.Is(err, ErrBusy) {
				// Not a failure, but an application sees an error it
				// may not expect: say which file and why.
				if fs.warnLog.Allow() {
					fs.log.Warn("open refused", "path", fs.nodes.path(in.NodeId), "inode", ino.Ino, "error", err)
				}
			}
			return fs.status("open", err)
		}
		h.f = &sharedFile{OpenFile: f, refs: 1}
	}
	out.Fh = fs.addHandle(h)
	out.OpenFlags = fuse.FOPEN_KEEP_CACHE
	if fs.directIO && ino.IsRegular() {
		out.OpenFlags = fuse.FOPEN_DIRECT_IO
	}
	return fuse.OK
}

func (fs *FileSystem) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	var n int
	var err error
	p := buf[:min(len(buf), int(in.Size))]
	if h := fs.handle(in.Fh); h != nil && h.f != nil {
		if i, ok := h.f.OpenFile.(Interruptible); ok {
			n, err = i.ReadAtOrCancel(cancel, p, int64(in.Offset))
		} else {
			n, err = h.f.ReadAt(p, int64(in.Offset))
		}
	} else {
		v, ino, st := fs.opened(in.NodeId, in.Fh)
		if !st.Ok() {
			return nil, st
		}
		n, err = v.ReadAt(ino, p, int64(in.Offset))
	}
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, fs.status("read", err)
	}
	return fuse.ReadResultData(buf[:n]), fuse.OK
}

func (fs *FileSystem) Release(_ <-chan struct{}, in *fuse.ReleaseIn) { fs.dropHandle(in.Fh) }

// Flush has nothing to write back; ENOSYS tells the kernel to stop
// sending it, which saves a round trip on every close.
func (fs *FileSystem) Flush(<-chan struct{}, *fuse.FlushIn) fuse.Status { return fuse.ENOSYS }

func (fs *FileSystem) OpenDir(_ <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if fs.noOpenDir {
		return fuse.ENOSYS
	}
	v, ino, st := fs.inode(in.NodeId)
	if !st.Ok() {
		return st
	}
	if !ino.IsDir() {
		return fuse.ENOTDIR
	}
	if ino.Encrypted() {
		return fs.status("opendir", ext4ro.ErrEncrypted)
	}
	out.Fh = fs.addHandle(&handle{v: v, in: ino})
	out.OpenFlags = fuse.FOPEN_KEEP_CACHE | fuse.FOPEN_CACHE_DIR
	return fuse.OK
}

func (fs *FileSystem) ReleaseDir(in *fuse.ReleaseIn) { fs.dropHandle(in.Fh) }

func (fs *FileSystem) ReadDir(_ <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return fs.readDir(in, out, false)
}

func (fs *FileSystem) ReadDirPlus(_ <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return fs.readDir(in, out, true)
}

// prefetchEntries is how many entries a listing prefetches the inodes of:
// about what one READDIRPLUS reply holds.
const prefetchEntries = 256

// readDir lists from the cookie in in.Offset. Entry offsets are ext4ro
// cookies, so a listing resumes exactly where the last one stopped.
func (fs *FileSystem) readDir(in *fuse.ReadIn, out *fuse.DirEntryList, plus bool) fuse.Status {
	if in.NodeId == genDirID {
		return fs.listGenerations(in.Offset, out, plus)
	}
	if !fs.noOpenDir {
		v, dir, st := fs.opened(in.NodeId, in.Fh)
		if !st.Ok() {
			return st
		}
		st, added := fs.list(v, dir, 0, in.Offset, in.NodeId, out, plus)
		return partial(st, added)
	}
	// No handle: the cookie says which view the listing is in. One whose
	// generation can no longer be read (the host dropped it: a listing
	// the kernel cached, or went on with, across switches) goes on in
	// the current view from the same position: cookies are byte
	// positions, read from the start of their block, so it sees each
	// entry the directory still has once, as a listing of a directory
	// that changes under it may.
	tag, pos := splitCookie(in.Offset)
	tag, v := fs.viewTagged(tag)
	if in.NodeId == fuseRoot && fs.showGens {
		// .generations first, then the root's own entries.
		if pos == 0 {
			e := fuse.DirEntry{Name: GenerationsDir, Mode: syscall.S_IFDIR, Ino: genDirID, Off: tagCookie(tag, showCookie)}
			if plus && out.AddDirLookupEntry(e) == nil || !plus && !out.AddDirEntry(e) {
				return fuse.OK
			}
		}
		if pos == showCookie {
			pos = 0
		}
	}
	st, added := fuse.Status(syscall.ESTALE), 0
	if v, dir, ist := fs.inodeIn(v, in.NodeId); ist.Ok() {
		st, added = fs.list(v, dir, tag, pos, in.NodeId, out, plus)
	} else {
		st = ist
	}
	if st == fuse.Status(syscall.ESTALE) && added == 0 {
		if ctag, cur := fs.viewTagged(0); ctag != tag {
			v, dir, ist := fs.inodeIn(cur, in.NodeId)
			if !ist.Ok() {
				return ist
			}
			st, added = fs.list(v, dir, ctag, pos, in.NodeId, out, plus)
		}
	}
	return partial(st, added)
}

// partial is what a listing that added entries before it failed
// answers: those entries (the kernel holds them, and asks for the rest,
// which fails again if it must).
func partial(st fuse.Status, added int) fuse.Status {
	if added > 0 {
		return fuse.OK
	}
	return st
}

// list lists directory dir of view v from position pos, its cookies
// tagged tag, and says how many entries it added.
func (fs *FileSystem) list(v *ext4ro.FS, dir *ext4ro.Inode, tag uint32, pos, nodeID uint64, out *fuse.DirEntryList, plus bool) (fuse.Status, int) {
	if !dir.IsDir() {
		return fuse.ENOTDIR, 0
	}
	added := 0
	var subdirs []*ext4ro.Inode
	if plus && fs.files != nil {
		// The inode-table blocks this reply will read, in one go; and,
		// once it is sent, what listing its subdirectories will read,
		// which a walk does next.
		var inos []uint32
		_ = v.ReadDir(dir, pos, func(e ext4ro.DirEntry) bool {
			if e.Name != "." && e.Name != ".." {
				inos = append(inos, e.Ino)
			}
			return len(inos) < prefetchEntries
		})
		v.PrefetchInodes(inos)
		defer func() {
			if len(subdirs) > 0 {
				go v.PrefetchSubdirs(subdirs)
			}
		}()
	}
	var ierr error
	err := v.ReadDir(dir, pos, func(e ext4ro.DirEntry) bool {
		de := fuse.DirEntry{Name: e.Name, Ino: uint64(e.Ino), Mode: e.Type, Off: tagCookie(tag, e.Cookie)}
		if !plus {
			ok := out.AddDirEntry(de)
			if ok {
				added++
			}
			return ok
		}
		var child *ext4ro.Inode
		if e.Name != "." && e.Name != ".." {
			if child, ierr = v.Inode(e.Ino); ierr != nil {
				return false
			}
			de.Mode = child.Mode
		}
		eo := out.AddDirLookupEntry(de)
		if eo == nil {
			return false
		}
		added++
		if child != nil {
			fs.fillEntry(v, child, eo, nodeID, e.Name)
			if child.IsDir() && fs.files != nil {
				subdirs = append(subdirs, child)
			}
		}
		return true
	})
	if err == nil {
		err = ierr
	}
	return fs.status("readdir", err), added
}

func (fs *FileSystem) GetXAttr(_ <-chan struct{}, h *fuse.InHeader, attr string, dest []byte) (uint32, fuse.Status) {
	if synthetic(h.NodeId) {
		return 0, fuse.ENODATA
	}
	v, in, st := fs.inode(h.NodeId)
	if !st.Ok() {
		return 0, st
	}
	val, err := v.GetXattr(in, attr)
	if err != nil {
		return 0, fs.status("getxattr", err)
	}
	if len(dest) < len(val) {
		return uint32(len(val)), fuse.ERANGE
	}
	return uint32(copy(dest, val)), fuse.OK
}

func (fs *FileSystem) ListXAttr(_ <-chan struct{}, h *fuse.InHeader, dest []byte) (uint32, fuse.Status) {
	if synthetic(h.NodeId) {
		return 0, fuse.OK
	}
	v, in, st := fs.inode(h.NodeId)
	if !st.Ok() {
		return 0, st
	}
	names, err := v.ListXattr(in)
	if err != nil {
		return 0, fs.status("listxattr", err)
	}
	var b []byte
	for _, n := range names {
		b = append(append(b, n...), 0)
	}
	if len(dest) < len(b) {
		return uint32(len(b)), fuse.ERANGE
	}
	return uint32(copy(dest, b)), fuse.OK
}

func (fs *FileSystem) StatFs(_ <-chan struct{}, _ *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	s := fs.View().Statfs()
	*out = fuse.StatfsOut{
		Blocks:  s.Blocks,
		Bfree:   s.FreeBlocks,
		Bavail:  s.AvailBlocks,
		Files:   s.Inodes,
		Ffree:   s.FreeInodes,
		Bsize:   s.BlockSize,
		Frsize:  s.BlockSize,
		NameLen: s.NameLen,
	}
	return fuse.OK
}

// Every operation that would change the filesystem is EROFS.

func (fs *FileSystem) SetAttr(<-chan struct{}, *fuse.SetAttrIn, *fuse.AttrOut) fuse.Status {
	return fuse.EROFS
}
func (fs *FileSystem) Mknod(<-chan struct{}, *fuse.MknodIn, string, *fuse.EntryOut) fuse.Status {
	return fuse.EROFS
}
func (fs *FileSystem) Mkdir(<-chan struct{}, *fuse.MkdirIn, string, *fuse.EntryOut) fuse.Status {
	return fuse.EROFS
}
func (fs *FileSystem) Unlink(<-chan struct{}, *fuse.InHeader, string) fuse.Status { return fuse.EROFS }
func (fs *FileSystem) Rmdir(<-chan struct{}, *fuse.InHeader, string) fuse.Status  { return fuse.EROFS }
func (fs *FileSystem) Rename(<-chan struct{}, *fuse.RenameIn, string, string) fuse.Status {
	return fuse.EROFS
}
func (fs *FileSystem) Link(<-chan struct{}, *fuse.LinkIn, string, *fuse.EntryOut) fuse.Status {
	return fuse.EROFS
}
func (fs *FileSystem) Symlink(<-chan struct{}, *fuse.InHeader, string, string, *fuse.EntryOut) fuse.Status {
	return fuse.EROFS
}
func (fs *FileSystem) Create(<-chan struct{}, *fuse.CreateIn, string, *fuse.CreateOut) fuse.Status {
	return fuse.EROFS
}
func (fs *FileSystem) Tmpfile(<-chan struct{}, *fuse.CreateIn, *fuse.CreateOut) fuse.Status {
	return fuse.EROFS
}
func (fs *FileSystem) Write(<-chan struct{}, *fuse.WriteIn, []byte) (uint32, fuse.Status) {
	return 0, fuse.EROFS
}
func (fs *FileSystem) CopyFileRange(<-chan struct{}, *fuse.CopyFileRangeIn) (uint32, fuse.Status) {
	return 0, fuse.EROFS
}
func (fs *FileSystem) Fallocate(<-chan struct{}, *fuse.FallocateIn) fuse.Status { return fuse.EROFS }
func (fs *FileSystem) SetXAttr(<-chan struct{}, *fuse.SetXAttrIn, string, []byte) fuse.Status {
	return fuse.EROFS
}
func (fs *FileSystem) RemoveXAttr(<-chan struct{}, *fuse.InHeader, string) fuse.Status {
	return fuse.EROFS
}
