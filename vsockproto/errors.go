package vsockproto

import "fmt"

// Code is an error code carried by an Error message.
type Code uint32

// Error codes (docs/protocol.md, "Errors").
const (
	CodeProtocol     Code = 1
	CodeNotSupported Code = 2
	CodeInvalid      Code = 3
	CodeVersion      Code = 4
	CodeNoExport     Code = 5
	CodeStale        Code = 6
	CodeBusy         Code = 7
	CodeNotFound     Code = 8
	CodeQuota        Code = 9
	CodeBadLease     Code = 10
	CodeRevoked      Code = 11
	CodeTooBig       Code = 12
	CodeInternal     Code = 13
	CodeGone         Code = 14
	CodeNotRegular   Code = 15
	CodeRetry        Code = 16
)

var codeNames = map[Code]string{
	CodeProtocol:     "protocol",
	CodeNotSupported: "not_supported",
	CodeInvalid:      "invalid",
	CodeVersion:      "version",
	CodeNoExport:     "no_export",
	CodeStale:        "stale",
	CodeBusy:         "busy",
	CodeNotFound:     "not_found",
	CodeQuota:        "quota",
	CodeBadLease:     "bad_lease",
	CodeRevoked:      "revoked",
	CodeTooBig:       "too_big",
	CodeInternal:     "internal",
	CodeGone:         "gone",
	CodeNotRegular:   "not_regular",
	CodeRetry:        "retry",
}

func (c Code) String() string {
	if s, ok := codeNames[c]; ok {
		return s
	}
	return fmt.Sprintf("code(%d)", uint32(c))
}

// Error is the Error message, and the error a Call returns when the peer
// answered with one. errors.Is matches it against the Err* values by code.
type Error struct {
	Code    Code
	Message string
}

// Sentinels for errors.Is.
var (
	ErrProtocol     = &Error{Code: CodeProtocol}
	ErrNotSupported = &Error{Code: CodeNotSupported}
	ErrInvalid      = &Error{Code: CodeInvalid}
	ErrVersion      = &Error{Code: CodeVersion}
	ErrNoExport     = &Error{Code: CodeNoExport}
	ErrStale        = &Error{Code: CodeStale}
	ErrBusy         = &Error{Code: CodeBusy}
	ErrNotFound     = &Error{Code: CodeNotFound}
	ErrQuota        = &Error{Code: CodeQuota}
	ErrBadLease     = &Error{Code: CodeBadLease}
	ErrRevoked      = &Error{Code: CodeRevoked}
	ErrTooBig       = &Error{Code: CodeTooBig}
	ErrInternal     = &Error{Code: CodeInternal}
	ErrGone         = &Error{Code: CodeGone}
	ErrNotRegular   = &Error{Code: CodeNotRegular}
	ErrRetry        = &Error{Code: CodeRetry}
)

// Errorf makes an Error with a formatted message.
func Errorf(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

func (e *Error) Error() string {
	if e.Message == "" {
		return e.Code.String()
	}
	return e.Code.String() + ": " + e.Message
}

// Is matches e against a sentinel of the same code.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Message == "" && t.Code == e.Code
}

func (*Error) Type() Type { return TypeError }

func (e *Error) Append(b []byte) []byte {
	msg := e.Message
	if len(msg) > MaxErrorMessage {
		msg = msg[:MaxErrorMessage]
	}
	return putStr(putU32(b, uint32(e.Code)), msg)
}

func (e *Error) decode(d *decoder) {
	e.Code = Code(d.u32())
	e.Message = d.str("message", MaxErrorMessage)
}
