package main

import (
	"errors"
	"strings"
)

// The phrases of tests/sandbox/workloads/outcomes.py (a unit test keeps them in step), then
// how pgx and Go's network stack say that the server closed the connection. Only the matched
// phrase is logged, never the error's message (it could name the server or the statement).
var refusedPhrases = []string{
	"too many clients",
	"remaining connection slots are reserved",
	"connection slots are reserved",
	"no more connections allowed",
}

var terminatedPhrases = []string{
	"terminating connection due to administrator command",
	"terminating connection due to idle-session timeout",
	"terminating connection due to idle-in-transaction timeout",
	"server closed the connection unexpectedly",
	"consuming input failed",
	"connection already closed",
	"the connection is closed",
	"the connection is lost",
	"could not receive data from server",
	"could not send data to server",
	"connection was closed in the middle of operation",
	"ssl syscall error: eof detected",
	// pgx and net: the connection was closed under the client.
	"conn closed",
	"unexpected eof",
	"broken pipe",
	"connection reset by peer",
	"use of closed network connection",
}

// classify gives a failed request's outcome and the phrase that decided it, as
// outcomes.classify does: "refused" for a connection the server would not open, "terminated"
// when the request's first query found its connection dead, "inflight_broken" when it died
// between two queries of the request, "error" for anything else.
func classify(err error, inFlight bool) (outcome string, reason string) {
	var text strings.Builder
	for e, depth := err, 0; e != nil && depth < 5; e, depth = errors.Unwrap(e), depth+1 {
		text.WriteString(strings.ToLower(e.Error()))
		text.WriteByte('\n')
	}
	message := text.String()
	for _, phrase := range refusedPhrases {
		if strings.Contains(message, phrase) {
			return "refused", phrase
		}
	}
	for _, phrase := range terminatedPhrases {
		if strings.Contains(message, phrase) {
			if inFlight {
				return "inflight_broken", phrase
			}
			return "terminated", phrase
		}
	}
	return "error", ""
}
