package ext4ro

import (
	"unicode/utf8"

	"golang.org/x/text/cases"
	"golang.org/x/text/unicode/norm"
)

// Casefolded directories (the casefold feature and the +F inode flag)
// match names without regard to case: the kernel compares and hashes
// names by their canonical caseless form, the NFD decomposition of the
// full Unicode case folding of the NFD form. Names that are not valid
// UTF-8 match byte for byte, as the kernel's non-strict mode does.
//
// The kernel's tables are Unicode 12.1; golang.org/x/text's are newer.
// Names using only characters that 12.1 already had fold identically.

const encodingUTF8 = 1 // s_encoding: utf8-12.1

// nameMatcher finds one name in a directory: key is what is hashed.
type nameMatcher struct {
	name, key string
	fold      bool
}

func (f *FS) matcher(dir *Inode, name string) nameMatcher {
	m := nameMatcher{name: name, key: name}
	if dir.Flags&flagCasefold != 0 && f.sb.incompat(incompatCasefold) && f.sb.Encoding == encodingUTF8 && utf8.ValidString(name) {
		m.fold = true
		m.key = casefold(name)
	}
	return m
}

func (m nameMatcher) match(entry string) bool {
	if entry == m.name {
		return true
	}
	return m.fold && utf8.ValidString(entry) && casefold(entry) == m.key
}

func casefold(s string) string {
	return norm.NFD.String(cases.Fold().String(norm.NFD.String(s)))
}
