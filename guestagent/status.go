package guestagent

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"time"
)

// Status is what 'leasefs guest status' shows of a guest.
type Status struct {
	Pid         int           `json:"pid"` // of the process serving the mount (leasefs guest calls Refresh on SIGHUP)
	Host        string        `json:"host"`
	Export      string        `json:"export"`
	Connected   bool          `json:"connected"`
	Since       time.Time     `json:"since"`                 // connected, disconnected, or started
	Gone        string        `json:"export_gone,omitempty"` // why the host no longer serves the export
	Down        string        `json:"down"`                  // the DownPolicy
	Session     string        `json:"session"`
	Reconnects  int           `json:"reconnects"`
	Resumes     int           `json:"resumes"`
	Generation  uint64        `json:"generation"`
	Label       string        `json:"label,omitempty"` // the generation's, as the host published it
	Latest      uint64        `json:"latest_announced"`
	Pinned      bool          `json:"pinned,omitempty"` // the mount stays on Generation (--generation, --label)
	Switched    time.Time     `json:"switched"`
	Follow      string        `json:"follow"`
	PageCache   PageCache     `json:"page_cache"`
	Publish     string        `json:"host_publishes"`
	Cache       CacheStatus   `json:"metadata_cache"`
	Nodes       int           `json:"kernel_nodes"`
	OpenFiles   int           `json:"open_files"`
	Fenced      []FencedFile  `json:"fenced,omitempty"`
	Device      *DeviceStatus `json:"device,omitempty"`
	LastError   string        `json:"last_error,omitempty"`
	LastErrorAt time.Time     `json:"last_error_at,omitzero"`
}

// CacheStatus is the metadata cache's use against its bound.
type CacheStatus struct {
	Blocks      int    `json:"blocks"`
	LimitBlocks int    `json:"limit_blocks"`
	Bytes       int64  `json:"bytes"`
	LimitBytes  int64  `json:"limit_bytes"`
	Hits        uint64 `json:"hits"`
	Misses      uint64 `json:"misses"`
	// With the device: windows of digests kept, and the blocks read
	// from the device that checked against them and that did not (and
	// came from the host).
	DigestWindows int    `json:"digest_windows"`
	FromDevice    uint64 `json:"from_device"`
	Unchecked     uint64 `json:"unchecked"`
}

// FencedFile is a file that was open when its lease ended: reads of it
// are ESTALE.
type FencedFile struct {
	Inode      uint32    `json:"inode"`
	Path       string    `json:"path,omitempty"`
	Generation uint64    `json:"generation"`
	Why        string    `json:"why"`
	At         time.Time `json:"at"`
}

// Status reports the client's state.
func (c *Client) Status() *Status {
	c.mu.Lock()
	st := &Status{
		Pid: os.Getpid(), Host: c.cfg.Addr.String(), Export: c.cfg.Export, Connected: c.sess.conn != nil, Since: c.started,
		Reconnects: c.sess.reconnects, Resumes: c.sess.resumes, Generation: c.sw.cur.gen, Label: c.sw.cur.label, Latest: c.sw.latest,
		Switched: c.sw.switched, Follow: c.cfg.Follow.String(), PageCache: c.cfg.PageCache, Publish: c.sess.policy.String(),
		OpenFiles: len(c.files.leases), LastError: c.lastErr, LastErrorAt: c.lastErrAt,
		Fenced: append([]FencedFile(nil), c.files.fenced...), Pinned: c.sw.pinned != 0,
	}
	switch {
	case c.sess.conn != nil:
		st.Since = c.sess.connected
	case !c.sess.lost.IsZero():
		st.Since = c.sess.lost
	}
	st.Gone, st.Down = c.sess.gone, c.cfg.Down.String()
	// The token is a secret (it resumes the session): show a digest.
	sum := sha256.Sum256(c.sess.token[:])
	st.Session = hex.EncodeToString(sum[:4])
	if c.dev != nil {
		d := c.device
		st.Device = &d
	}
	c.mu.Unlock()
	st.Cache = c.cache.stats()
	st.Nodes = c.fs.Nodes()
	return st
}
