// Command loadgen drives a kdcube server over its SSE wire contract
// (GET /sse/stream, POST /sse/chat) and prints one JSON result.
//
// Modes:
//
//	turns    C users, each with an open stream, posting turns back to back
//	streams  N streams posting one turn each at the same moment
//	idle     N streams that only wait for T seconds, then close
//
// Progress goes to stderr as JSON lines with a "phase" key; the result goes to
// stdout, or to -out. Only loopback URLs are accepted.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"
)

type options struct {
	mode               string
	base               string
	out                string
	users              int
	streams            int
	duration           time.Duration
	turns              int
	warmupTurns        int
	turnTimeout        time.Duration
	readyTimeout       time.Duration
	bundle             string
	promptSize         int
	newConversation    bool
	waitIdle           bool
	expectDeltas       int
	hold               time.Duration
	connectConcurrency int
	maxRuntime         time.Duration
	streamPrefix       string
	userPrefix         string
}

func parseOptions(args []string) (options, error) {
	var o options
	fs := flag.NewFlagSet("loadgen", flag.ContinueOnError)
	fs.StringVar(&o.mode, "mode", "turns", "turns, streams or idle")
	fs.StringVar(&o.base, "url", "http://127.0.0.1:8080", "server base URL (loopback only)")
	fs.StringVar(&o.out, "out", "", "write the JSON result here instead of stdout")
	fs.IntVar(&o.users, "users", 1, "turns: concurrent users (C)")
	fs.IntVar(&o.streams, "streams", 100, "streams/idle: number of streams (N)")
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "turns: measured window (0: use -turns)")
	fs.IntVar(&o.turns, "turns", 0, "turns: total measured turns across users (0: no cap)")
	fs.IntVar(&o.warmupTurns, "warmup-turns", 1, "turns: unmeasured turns per user first")
	fs.DurationVar(&o.turnTimeout, "turn-timeout", 60*time.Second, "give up on a turn after this")
	fs.DurationVar(&o.readyTimeout, "ready-timeout", 60*time.Second, "give up on a stream's ready frame after this")
	fs.StringVar(&o.bundle, "bundle", "echo", "bundle_id to post to (empty: server default)")
	fs.IntVar(&o.promptSize, "prompt-size", 100, "prompt length in bytes (at least the echo's chunks)")
	fs.BoolVar(&o.newConversation, "new-conversation", false, "turns: new conversation every turn")
	fs.BoolVar(&o.waitIdle, "wait-idle", false, "turns: also wait for conv_status after the terminal event")
	fs.IntVar(&o.expectDeltas, "expect-deltas", 0, "streams: deltas per complete turn; fewer counts as short")
	fs.DurationVar(&o.hold, "hold", 10*time.Second, "idle: how long to hold the streams open")
	fs.IntVar(&o.connectConcurrency, "connect-concurrency", 64, "streams/idle: connections being opened at once")
	fs.DurationVar(&o.maxRuntime, "max-runtime", 10*time.Minute, "hard stop for the whole run")
	fs.StringVar(&o.streamPrefix, "stream-prefix", "", "stream_id prefix (default: lg<pid>)")
	fs.StringVar(&o.userPrefix, "user-prefix", "u", "turns: user ids are this plus 0..C-1 (bearer dev-<id>)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}

	if o.streamPrefix == "" {
		o.streamPrefix = fmt.Sprintf("lg%d", os.Getpid())
	}

	o.base = strings.TrimRight(o.base, "/")
	return o, validate(o)
}

func validate(o options) error {
	if err := checkLoopback(o.base); err != nil {
		return err
	}

	switch {
	case o.users < 1 || o.users > 100000:
		return fmt.Errorf("-users %d: want 1..100000", o.users)
	case o.streams < 1 || o.streams > 100000:
		return fmt.Errorf("-streams %d: want 1..100000", o.streams)
	case o.promptSize < 1 || o.promptSize > 1<<20:
		return fmt.Errorf("-prompt-size %d: want 1..1048576", o.promptSize)
	case o.connectConcurrency < 1:
		return fmt.Errorf("-connect-concurrency %d: want at least 1", o.connectConcurrency)
	case o.maxRuntime <= 0:
		return fmt.Errorf("-max-runtime must be positive")
	}
	return nil
}

func run(ctx context.Context, o options) (any, error) {
	switch o.mode {
	case "turns":
		return runTurns(ctx, turnsConfig{
			base: o.base, users: o.users, duration: o.duration, turns: o.turns,
			warmupTurns: o.warmupTurns, turnTimeout: o.turnTimeout,
			readyTimeout: o.readyTimeout, bundle: o.bundle, promptSize: o.promptSize,
			newConversation: o.newConversation, waitIdle: o.waitIdle,
			streamPrefix: o.streamPrefix, userPrefix: o.userPrefix,
		})
	case "streams":
		return runStreams(ctx, streamsConfig{
			base: o.base, streams: o.streams, bundle: o.bundle, promptSize: o.promptSize,
			expectDeltas: o.expectDeltas, turnTimeout: o.turnTimeout,
			readyTimeout: o.readyTimeout, connectConcurrency: o.connectConcurrency,
			streamPrefix: o.streamPrefix,
		})
	case "idle":
		return runIdle(ctx, idleConfig{
			base: o.base, streams: o.streams, hold: o.hold,
			readyTimeout: o.readyTimeout, connectConcurrency: o.connectConcurrency,
			streamPrefix: o.streamPrefix,
		})
	}
	return nil, fmt.Errorf("-mode %q: want turns, streams or idle", o.mode)
}

func writeResult(path string, result any) error {
	b, err := json.MarshalIndent(result, "", "  ")
	if err != nil {
		return err
	}

	b = append(b, '\n')
	if path == "" {
		_, err = os.Stdout.Write(b)
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

func main() {
	o, err := parseOptions(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(2)
	}

	raiseFileLimit()
	// Every loop below also watches this context, so the run always ends.
	ctx, cancel := context.WithTimeout(context.Background(), o.maxRuntime)
	defer cancel()
	result, err := run(ctx, o)
	if err == nil {
		err = writeResult(o.out, result)
	}

	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
}
