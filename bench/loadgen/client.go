package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

var (
	errReadyTimeout = errors.New("no ready frame in time")
	errTurnTimeout  = errors.New("no terminal event in time")
	errStreamClosed = errors.New("stream closed during the turn")
)

// httpStatusError is a non-200 answer from the server.
type httpStatusError struct {
	status int
	body   string
}

func (e *httpStatusError) Error() string {
	return fmt.Sprintf("HTTP %d: %s", e.status, strings.TrimSpace(e.body))
}

// chatError is a turn that ended with chat_error.
type chatError struct{ errorType string }

func (e *chatError) Error() string { return "chat_error " + e.errorType }

// newHTTPClient returns one client for every stream and POST. Keep-alive lets
// POSTs reuse connections; Proxy stays nil so that a proxy variable in the
// environment can never send bench traffic anywhere but loopback.
func newHTTPClient(maxConns int) *http.Client {
	dialer := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}
	transport := &http.Transport{
		Proxy:                 nil,
		DialContext:           dialer.DialContext,
		MaxIdleConns:          maxConns,
		MaxIdleConnsPerHost:   maxConns,
		IdleConnTimeout:       90 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
		DisableCompression:    true,
		ForceAttemptHTTP2:     false,
		// Small buffers: idle mode holds thousands of connections.
		ReadBufferSize:  4096,
		WriteBufferSize: 4096,
	}
	return &http.Client{Transport: transport}
}

// checkLoopback refuses any base URL whose host is not a loopback address:
// the bench must never send load anywhere else.
func checkLoopback(base string) error {
	u, err := url.Parse(base)
	if err != nil {
		return fmt.Errorf("bad -url %q: %w", base, err)
	}

	if u.Scheme != "http" {
		return fmt.Errorf("-url %q: only http:// is supported", base)
	}

	host := u.Hostname()
	if host == "localhost" {
		return nil
	}

	ip := net.ParseIP(host)
	if ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("-url %q: host must be a loopback address", base)
	}
	return nil
}

type promptEvent struct {
	Type    string        `json:"type"`
	Payload promptPayload `json:"payload"`
}

type promptPayload struct {
	Mime  string     `json:"mime"`
	Event promptText `json:"event"`
}

type promptText struct {
	Text string `json:"text"`
}

type chatRequest struct {
	ConversationID string        `json:"conversation_id,omitempty"`
	BundleID       string        `json:"bundle_id,omitempty"`
	ExternalEvents []promptEvent `json:"external_events"`
}

// chatAck is the 200 answer to POST /sse/chat.
type chatAck struct {
	Status         string `json:"status"`
	ConversationID string `json:"conversation_id"`
	TurnID         string `json:"turn_id"`
}

// submitTurn posts one prompt for the user's stream and returns the ack. The
// body is read to its end so the connection goes back to the keep-alive pool.
func submitTurn(
	ctx context.Context, client *http.Client, base string, s *sseStream,
	bundle, conversationID, text string,
) (chatAck, error) {
	body, err := json.Marshal(chatRequest{
		ConversationID: conversationID,
		BundleID:       bundle,
		ExternalEvents: []promptEvent{{
			Type: "event.user.prompt",
			Payload: promptPayload{
				Mime:  "text/plain",
				Event: promptText{Text: text},
			},
		}},
	})
	if err != nil {
		return chatAck{}, err
	}

	u := base + "/sse/chat?stream_id=" + url.QueryEscape(s.streamID)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(body))
	if err != nil {
		return chatAck{}, err
	}

	req.Header.Set("Authorization", "Bearer dev-"+s.user)
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return chatAck{}, err
	}

	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return chatAck{}, err
	}

	if resp.StatusCode != http.StatusOK {
		return chatAck{}, &httpStatusError{status: resp.StatusCode, body: string(raw)}
	}

	var ack chatAck
	if err := json.Unmarshal(raw, &ack); err != nil || ack.TurnID == "" {
		return chatAck{}, fmt.Errorf("bad ack %q", truncate(string(raw), 200))
	}
	return ack, nil
}

// errorKind names an error for the per-kind counts in the report.
func errorKind(err error) string {
	var statusErr *httpStatusError
	var chatErr *chatError
	switch {
	case errors.As(err, &statusErr):
		return fmt.Sprintf("http_%d", statusErr.status)
	case errors.As(err, &chatErr):
		return "chat_error:" + chatErr.errorType
	case errors.Is(err, errTurnTimeout):
		return "turn_timeout"
	case errors.Is(err, errReadyTimeout):
		return "ready_timeout"
	case errors.Is(err, errStreamClosed):
		return "stream_closed"
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return "deadline"
	case strings.HasPrefix(err.Error(), "bad ack"):
		return "bad_ack"
	case strings.Contains(err.Error(), "before ready"):
		return "stream_ended_before_ready"
	}
	return "transport"
}

// promptOf pads label to size bytes. The echo bundle splits the prompt into
// `chunks` pieces, so a prompt shorter than that would yield empty deltas.
func promptOf(label string, size int) string {
	if len(label) >= size {
		return label
	}
	return label + " " + strings.Repeat("x", size-len(label)-1)
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
