package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	phaseOut = io.Discard
	os.Exit(m.Run())
}

func TestFrameReaderSplitsFrames(t *testing.T) {
	long := strings.Repeat("x", 10000) // longer than the bufio buffer
	body := ": keepalive\n\n" +
		"id: 1\r\nevent: ready\r\ndata: {\"a\":1}\r\n\r\n" +
		"event: chat_delta\ndata: line1\ndata: line2\n\n" +
		"data: " + long + "\n\n"
	fr := newFrameReader(strings.NewReader(body))
	want := []struct {
		r    route
		data string
	}{
		{routeReady, `{"a":1}`},
		{routeDelta, "line1\nline2"},
		{routeOther, long},
	}
	for i, w := range want {
		r, data, err := fr.next()
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}

		if r != w.r || string(data) != w.data {
			t.Fatalf("frame %d: got %v %.40q, want %v %.40q", i, r, data, w.r, w.data)
		}
	}

	if _, _, err := fr.next(); err == nil {
		t.Fatal("want EOF after the last frame")
	}

	if fr.comments != 1 {
		t.Fatalf("comments = %d, want 1", fr.comments)
	}
}

func TestTurnIDOf(t *testing.T) {
	cases := map[string]string{
		`{"type":"chat.delta","conversation":{"session_id":"s","turn_id":"t1"}}`:      "t1",
		`{"data":{"turn_id":"no"},"conversation": {"turn_id" : "t2"}}`:                "t2",
		`{"event":{"title":"conversation"},"conversation":{"turn_id":"t3"}}`:          "t3",
		`{"conversation":{"conversation_id":"c","turn_id":"t\u0034"}}`:                "t4",
		`{"conversation":{"session_id":"s"},"data":{"turn_id":"not-the-envelope's"}}`: "",
		`{"type":"conv.status","data":{"current_turn_id":"x"}}`:                       "",
	}
	for in, want := range cases {
		if got := turnIDOf([]byte(in)); got != want {
			t.Errorf("turnIDOf(%s) = %q, want %q", in, got, want)
		}
	}
}

func TestCheckLoopback(t *testing.T) {
	for _, ok := range []string{"http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:2"} {
		if err := checkLoopback(ok); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}

	for _, bad := range []string{"http://10.0.0.1:80", "http://example.org", "https://127.0.0.1"} {
		if checkLoopback(bad) == nil {
			t.Errorf("%s: accepted", bad)
		}
	}
}

func TestTurnsModeAgainstFake(t *testing.T) {
	srv := newFakeServer(t, 4, time.Millisecond)
	res, err := runTurns(testContext(t), turnsConfig{
		base: srv.URL, users: 3, turns: 30, warmupTurns: 1,
		turnTimeout: 5 * time.Second, readyTimeout: 5 * time.Second,
		bundle: "echo", streamPrefix: "t",
	})
	if err != nil {
		t.Fatal(err)
	}

	if res.Turns != 30 || res.Errors.Total != 0 || res.TurnsNoDelta != 0 {
		t.Fatalf("turns=%d errors=%+v no_delta=%d", res.Turns, res.Errors, res.TurnsNoDelta)
	}

	if res.FirstDeltaMs.P50 > res.FinalMs.P50 || res.FinalMs.P50 < 4 {
		t.Fatalf("implausible latencies: first %+v final %+v", res.FirstDeltaMs, res.FinalMs)
	}

	if got := srv.conversations(); got != 3 {
		t.Fatalf("conversations = %d, want one per user", got)
	}
}

func TestTurnsModeCountsChatErrors(t *testing.T) {
	srv := newFakeServer(t, 2, 0)
	res, err := runTurns(testContext(t), turnsConfig{
		base: srv.URL, users: 2, turns: 6, turnTimeout: 5 * time.Second,
		readyTimeout: 5 * time.Second, bundle: "fail", streamPrefix: "e",
	})
	if err != nil {
		t.Fatal(err)
	}

	if res.Turns != 0 || res.Errors.ByKind["chat_error:bundle_error"] != 6 {
		t.Fatalf("turns=%d errors=%+v", res.Turns, res.Errors)
	}
}

func TestStreamsModeAgainstFake(t *testing.T) {
	srv := newFakeServer(t, 5, 10*time.Millisecond)
	res, err := runStreams(testContext(t), streamsConfig{
		base: srv.URL, streams: 20, bundle: "echo", expectDeltas: 5,
		turnTimeout: 5 * time.Second, readyTimeout: 5 * time.Second,
		connectConcurrency: 4, streamPrefix: "s",
	})
	if err != nil {
		t.Fatal(err)
	}

	if res.Completed != 20 || res.ShortStreams != 0 || res.Errors.Total != 0 {
		t.Fatalf("completed=%d short=%d errors=%+v", res.Completed, res.ShortStreams, res.Errors)
	}

	if res.DeltaGapMs.N != 20*4 || res.CompletionMs.P50 < 50 {
		t.Fatalf("gaps %+v completion %+v", res.DeltaGapMs, res.CompletionMs)
	}
}

func TestIdleModeAgainstFake(t *testing.T) {
	srv := newFakeServer(t, 1, 0)
	srv.keepalive = 50 * time.Millisecond
	res, err := runIdle(testContext(t), idleConfig{
		base: srv.URL, streams: 50, hold: 300 * time.Millisecond,
		readyTimeout: 5 * time.Second, connectConcurrency: 8, streamPrefix: "i",
	})
	if err != nil {
		t.Fatal(err)
	}

	if res.StreamsOpened != 50 || res.DroppedEarly != 0 || res.Keepalives == 0 {
		t.Fatalf("%+v", res)
	}

	waitFor(t, func() bool { return srv.openStreams() == 0 })
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func waitFor(t *testing.T, cond func() bool) {
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 5 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// fakeServer speaks the parts of PROTOCOL.md the load generator uses, with an
// echo bundle of `chunks` deltas `delay` apart. Bundle "fail" ends every turn
// with chat_error. It sends the turn's first events before the POST's ack, as
// a real server may, to check that the client does not lose them.
type fakeServer struct {
	*httptest.Server
	chunks    int
	delay     time.Duration
	keepalive time.Duration

	mu      sync.Mutex
	streams map[string]chan string
	convs   map[string]bool
	seq     int
}

func newFakeServer(t *testing.T, chunks int, delay time.Duration) *fakeServer {
	f := &fakeServer{
		chunks: chunks, delay: delay, keepalive: time.Hour,
		streams: map[string]chan string{}, convs: map[string]bool{},
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/sse/stream", f.stream)
	mux.HandleFunc("/sse/chat", f.chat)
	f.Server = httptest.NewServer(mux)
	t.Cleanup(f.Close)
	return f
}

func (f *fakeServer) openStreams() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.streams)
}

func (f *fakeServer) conversations() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.convs)
}

func (f *fakeServer) stream(w http.ResponseWriter, r *http.Request) {
	id := r.URL.Query().Get("stream_id")
	frames := make(chan string, 1024)
	f.mu.Lock()
	f.streams[id] = frames
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		delete(f.streams, id)
		f.mu.Unlock()
	}()

	w.Header().Set("Content-Type", "text/event-stream")
	flusher := w.(http.Flusher)
	fmt.Fprintf(w, "id: 0\nevent: ready\ndata: {\"stream_id\":%q}\n\n", id)
	flusher.Flush()
	tick := time.NewTicker(f.keepalive)
	defer tick.Stop()
	for {
		select {
		case frame := <-frames:
			fmt.Fprint(w, frame)
		case <-tick.C:
			fmt.Fprint(w, ": keepalive\n\n")
		case <-r.Context().Done():
			return
		}
		flusher.Flush()
	}
}

func (f *fakeServer) chat(w http.ResponseWriter, r *http.Request) {
	var req chatRequest
	if json.NewDecoder(r.Body).Decode(&req) != nil || len(req.ExternalEvents) != 1 ||
		!strings.HasPrefix(r.Header.Get("Authorization"), "Bearer dev-") {
		http.Error(w, `{"error":"bad_request"}`, http.StatusBadRequest)
		return
	}

	f.mu.Lock()
	frames := f.streams[r.URL.Query().Get("stream_id")]
	f.seq++
	turnID := fmt.Sprintf("turn-%d", f.seq)
	conv := req.ConversationID
	if conv == "" {
		conv = fmt.Sprintf("conv-%d", f.seq)
	}
	f.convs[conv] = true
	f.mu.Unlock()
	if frames == nil {
		http.Error(w, `{"error":"no_stream"}`, http.StatusNotFound)
		return
	}

	send := func(route, extra string) {
		frames <- fmt.Sprintf("event: %s\ndata: {\"type\":%q,\"conversation\":"+
			"{\"conversation_id\":%q,\"turn_id\":%q}%s}\n\n", route, route, conv, turnID, extra)
	}
	send("conv_status", `,"data":{"state":"in_progress"}`)
	send("chat_start", "")
	json.NewEncoder(w).Encode(chatAck{Status: "processing_started", ConversationID: conv, TurnID: turnID})
	go func() {
		for i := 0; i < f.chunks; i++ {
			time.Sleep(f.delay)
			send("chat_delta", fmt.Sprintf(`,"delta":{"text":"x","index":%d}`, i))
		}

		if req.BundleID == "fail" {
			send("chat_error", `,"data":{"error_type":"bundle_error"}`)
		} else {
			send("chat_complete", `,"data":{"final_answer":"x"}`)
		}
		send("conv_status", `,"data":{"state":"idle"}`)
	}()
}
