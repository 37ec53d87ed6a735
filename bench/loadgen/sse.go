package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync/atomic"
	"time"
)

// route is the SSE `event:` name, reduced to the few the bench cares about so
// that classifying a frame costs a comparison, not an allocation.
type route int

const (
	routeOther route = iota
	routeReady
	routeConvStatus
	routeStart
	routeDelta
	routeComplete
	routeError
)

func routeOf(name []byte) route {
	// switch on string(b) does not allocate in Go.
	switch string(name) {
	case "ready":
		return routeReady
	case "conv_status":
		return routeConvStatus
	case "chat_start":
		return routeStart
	case "chat_delta":
		return routeDelta
	case "chat_complete":
		return routeComplete
	case "chat_error":
		return routeError
	}
	return routeOther
}

// frameReader splits a text/event-stream body into frames, line by line.
// It reuses its buffers, so the data it returns is valid only until the next
// call to next.
type frameReader struct {
	r        *bufio.Reader
	event    []byte
	data     []byte
	hasData  bool
	comments int64 // comment lines seen, i.e. `: keepalive`
	line     []byte
}

func newFrameReader(r io.Reader) *frameReader {
	return &frameReader{r: bufio.NewReaderSize(r, 4096)}
}

// readLine returns one line without its line ending. A line longer than the
// bufio buffer is stitched together into fr.line.
func (fr *frameReader) readLine() ([]byte, error) {
	chunk, err := fr.r.ReadSlice('\n')
	if err == nil {
		return trimEOL(chunk), nil
	}

	if !errors.Is(err, bufio.ErrBufferFull) {
		return nil, err
	}

	fr.line = append(fr.line[:0], chunk...)
	for {
		chunk, err = fr.r.ReadSlice('\n')
		fr.line = append(fr.line, chunk...)
		if err == nil {
			return trimEOL(fr.line), nil
		}

		if !errors.Is(err, bufio.ErrBufferFull) {
			return nil, err
		}
	}
}

func trimEOL(b []byte) []byte {
	b = bytes.TrimSuffix(b, []byte("\n"))
	return bytes.TrimSuffix(b, []byte("\r"))
}

// next returns the route and data of the next complete frame. A frame without
// an `event:` line is a "message" per the SSE spec and comes back as
// routeOther.
func (fr *frameReader) next() (route, []byte, error) {
	fr.event = fr.event[:0]
	fr.data = fr.data[:0]
	fr.hasData = false
	for {
		line, err := fr.readLine()
		if err != nil {
			return routeOther, nil, err
		}

		if len(line) == 0 {
			if len(fr.event) == 0 && !fr.hasData {
				continue // stray blank line, e.g. after a keepalive comment
			}
			return routeOf(fr.event), fr.data, nil
		}

		fr.field(line)
	}
}

func (fr *frameReader) field(line []byte) {
	if line[0] == ':' {
		// Read from other goroutines (idle mode counts keepalives).
		atomic.AddInt64(&fr.comments, 1)
		return
	}

	name, value := line, []byte(nil)
	if i := bytes.IndexByte(line, ':'); i >= 0 {
		name, value = line[:i], line[i+1:]
		value = bytes.TrimPrefix(value, []byte(" "))
	}

	switch string(name) {
	case "event":
		fr.event = append(fr.event[:0], value...)
	case "data":
		if fr.hasData {
			fr.data = append(fr.data, '\n')
		}
		fr.data = append(fr.data, value...)
		fr.hasData = true
	}
	// `id:` and `retry:` are not needed by the bench.
}

var (
	conversationKey = []byte(`"conversation"`)
	turnIDKey       = []byte(`"turn_id"`)
)

// turnIDOf returns conversation.turn_id from an event envelope. The fast path
// scans bytes because it runs for every delta and the client shares its two
// cores with the server; anything unusual falls back to encoding/json.
func turnIDOf(data []byte) string {
	if id, ok := scanTurnID(data); ok {
		return id
	}

	var env struct {
		Conversation struct {
			TurnID string `json:"turn_id"`
		} `json:"conversation"`
	}
	if json.Unmarshal(data, &env) != nil {
		return ""
	}
	return env.Conversation.TurnID
}

func scanTurnID(data []byte) (string, bool) {
	rest := data
	for {
		i := bytes.Index(rest, conversationKey)
		if i < 0 {
			return "", false
		}

		rest = rest[i+len(conversationKey):]
		obj, ok := expectByte(rest, ':')
		if !ok {
			continue // the word appeared as a value, not as the key
		}

		obj, ok = expectByte(obj, '{')
		if !ok {
			continue
		}

		// The first "turn_id" key after `"conversation": {` is the envelope's;
		// the conversation object holds only flat string fields.
		j := bytes.Index(obj, turnIDKey)
		end := bytes.IndexByte(obj, '}')
		if j < 0 || (end >= 0 && end < j) {
			return "", false
		}
		return stringValue(obj[j+len(turnIDKey):])
	}
}

// expectByte skips JSON whitespace and consumes c, reporting whether it was
// there.
func expectByte(b []byte, c byte) ([]byte, bool) {
	b = bytes.TrimLeft(b, " \t\r\n")
	if len(b) == 0 || b[0] != c {
		return b, false
	}
	return b[1:], true
}

// stringValue parses `: "value"` with no escapes inside; escapes send the
// caller to the slow path.
func stringValue(b []byte) (string, bool) {
	b, ok := expectByte(b, ':')
	if !ok {
		return "", false
	}

	b, ok = expectByte(b, '"')
	if !ok {
		return "", false
	}

	end := bytes.IndexByte(b, '"')
	if end < 0 || bytes.IndexByte(b[:end], '\\') >= 0 {
		return "", false
	}
	return string(b[:end]), true
}

// errorTypeOf returns data.error_type of a chat_error envelope.
func errorTypeOf(data []byte) string {
	var env struct {
		Data struct {
			ErrorType string `json:"error_type"`
		} `json:"data"`
	}
	if json.Unmarshal(data, &env) != nil || env.Data.ErrorType == "" {
		return "unknown"
	}
	return env.Data.ErrorType
}

// streamEvent is what a stream's reader hands to the code driving turns: the
// route, the turn it belongs to and when it arrived. The arrival time is taken
// by the reader so that a consumer busy posting the next request does not
// inflate latencies.
type streamEvent struct {
	route     route
	turnID    string
	errorType string
	at        time.Time
}

// sseStream is one open GET /sse/stream connection and its reader goroutine.
type sseStream struct {
	user     string
	streamID string
	events   chan streamEvent // nil when the stream does not forward events
	ready    chan struct{}    // closed when the `ready` frame arrives
	done     chan struct{}    // closed when the reader stops
	openedAt time.Time        // just before the GET was sent
	readyAt  time.Time        // valid once ready is closed
	err      error            // why the reader stopped; valid once done is closed
	frames   atomic.Int64
	closed   atomic.Bool // set by close, so that its read error is not a failure
	cancel   context.CancelFunc
	body     io.ReadCloser
	comments func() int64
}

// openStream connects one SSE stream for user and starts its reader. With
// forward set, every frame after `ready` is delivered on events; idle streams
// pass false and only count frames.
func openStream(
	ctx context.Context, client *http.Client, base, user, streamID string, forward bool,
) (*sseStream, error) {
	openedAt := time.Now()
	ctx, cancel := context.WithCancel(ctx)
	u := base + "/sse/stream?stream_id=" + url.QueryEscape(streamID)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		cancel()
		return nil, err
	}

	req.Header.Set("Authorization", "Bearer dev-"+user)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := client.Do(req)
	if err != nil {
		cancel()
		return nil, err
	}

	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		cancel()
		return nil, &httpStatusError{status: resp.StatusCode, body: string(body)}
	}

	s := &sseStream{
		user:     user,
		streamID: streamID,
		openedAt: openedAt,
		ready:    make(chan struct{}),
		done:     make(chan struct{}),
		cancel:   cancel,
		body:     resp.Body,
	}
	if forward {
		// Room for several turns of 20-chunk events, so the reader never
		// waits on a consumer that is between turns.
		s.events = make(chan streamEvent, 256)
	}

	fr := newFrameReader(resp.Body)
	s.comments = func() int64 { return atomic.LoadInt64(&fr.comments) }
	go s.read(ctx, fr)
	return s, nil
}

func (s *sseStream) read(ctx context.Context, fr *frameReader) {
	defer close(s.done)
	gotReady := false
	for {
		r, data, err := fr.next()
		if err != nil {
			s.err = err
			if !gotReady {
				s.err = fmt.Errorf("stream ended before ready: %w", err)
			}
			return
		}

		now := time.Now()
		s.frames.Add(1)
		if r == routeReady && !gotReady {
			gotReady = true
			s.readyAt = now
			close(s.ready)
			continue
		}

		if s.events == nil {
			continue
		}

		ev := streamEvent{route: r, at: now}
		switch r {
		case routeDelta, routeComplete, routeStart:
			ev.turnID = turnIDOf(data)
		case routeError:
			ev.turnID = turnIDOf(data)
			ev.errorType = errorTypeOf(data)
		}

		select {
		case s.events <- ev:
		case <-ctx.Done():
			s.err = ctx.Err()
			return
		}
	}
}

// waitReady blocks until the `ready` frame, the stream's end, or timeout.
func (s *sseStream) waitReady(timeout time.Duration) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-s.ready:
		return nil
	case <-s.done:
		return s.err
	case <-t.C:
		return errReadyTimeout
	}
}

// alive reports whether the reader is still running.
func (s *sseStream) alive() bool {
	select {
	case <-s.done:
		return false
	default:
		return true
	}
}

// close drops the connection; the server sees the client go away.
func (s *sseStream) close() {
	s.closed.Store(true)
	s.cancel()
	s.body.Close()
}

// drain discards events already queued, e.g. the trailing conv_status of the
// previous turn, so they do not pile up in the buffer.
func (s *sseStream) drain() {
	for {
		select {
		case <-s.events:
		default:
			return
		}
	}
}
