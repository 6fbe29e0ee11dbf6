package layout

import "testing"

// Golden values, computed from the protocol's description with another
// FNV-1a implementation (Python's, over struct.pack('<QQQB', ...)).
func TestHashGolden(t *testing.T) {
	for _, c := range []struct {
		runs []Extent
		want uint64
	}{
		{[]Extent{{Logical: 0, Physical: 100, Count: 4}}, 0x0bc945dc6a33b19f},
		{[]Extent{{0, 100, 4, false}, {10, 7, 2, true}}, 0xa3b3b69308923a03},
	} {
		if got := Hash(c.runs); got != c.want {
			t.Errorf("Hash(%v) = %#x, want %#x", c.runs, got, c.want)
		}
	}
}

func TestHashMergesRuns(t *testing.T) {
	one := []Extent{{Logical: 0, Physical: 100, Count: 4}}
	split := []Extent{{0, 100, 1, false}, {1, 101, 3, false}}
	withEmpty := []Extent{{0, 100, 1, false}, {1, 500, 0, false}, {1, 101, 3, false}}
	if Hash(one) != Hash(split) || Hash(one) != Hash(withEmpty) {
		t.Fatal("runs that continue each other hash differently from one run")
	}
	for _, other := range [][]Extent{
		{{0, 100, 4, true}},                      // unwritten
		{{0, 101, 4, false}},                     // elsewhere on the device
		{{1, 100, 4, false}},                     // elsewhere in the file
		{{0, 100, 3, false}},                     // shorter
		{{0, 100, 1, false}, {2, 102, 2, false}}, // a hole
		{{0, 100, 1, false}, {1, 101, 3, true}},  // partly unwritten: not merged
	} {
		if Hash(other) == Hash(one) {
			t.Errorf("%v hashes like %v", other, one)
		}
	}
	if Hash(nil) != 0 || Hash([]Extent{{5, 9, 0, false}}) != 0 {
		t.Fatal("no mapped blocks must hash to 0")
	}
}
