package main

import (
	"context"
	"time"
)

// idleConfig drives `idle` mode: N streams that only wait, to measure what an
// open stream costs the server.
type idleConfig struct {
	base               string
	streams            int
	hold               time.Duration
	readyTimeout       time.Duration
	connectConcurrency int
	streamPrefix       string
}

type idleResult struct {
	Mode          string      `json:"mode"`
	Streams       int         `json:"streams"`
	StreamsOpened int         `json:"streams_opened"`
	ConnectS      float64     `json:"connect_s"`
	ReadyMs       summary     `json:"ready_ms"`
	HoldS         float64     `json:"hold_s"`
	DroppedEarly  int         `json:"dropped_early"`
	Keepalives    int64       `json:"keepalives"`
	Errors        *errorTally `json:"errors"`
	Client        clientCost  `json:"client"`
}

func runIdle(ctx context.Context, cfg idleConfig) (idleResult, error) {
	client := newHTTPClient(64)
	tally := newErrorTally()
	before := readUsage()
	connectStart := time.Now()
	streams := openMany(ctx, client, cfg.base, cfg.streamPrefix, cfg.streams,
		cfg.connectConcurrency, cfg.readyTimeout, false, tally)
	connect := time.Since(connectStart)

	var readies []time.Duration
	for _, s := range streams {
		if s != nil {
			readies = append(readies, s.readyAt.Sub(s.openedAt))
		}
	}

	// The runner samples the server's RSS when it sees this line.
	phase("holding", map[string]any{"streams": len(readies)})
	hold(ctx, cfg.hold)
	res := idleResult{
		Mode:          "idle",
		Streams:       cfg.streams,
		StreamsOpened: len(readies),
		ConnectS:      round3(connect.Seconds()),
		ReadyMs:       summarize(readies),
		HoldS:         cfg.hold.Seconds(),
		Errors:        tally,
	}

	for _, s := range streams {
		if s == nil {
			continue
		}

		if !s.alive() {
			res.DroppedEarly++
			tally.add("hold "+s.user, s.err)
		}
		res.Keepalives += s.comments()
	}

	closeAll(streams)
	phase("closed", nil)
	res.Client = newClientCost(before, readUsage(), len(readies))
	return res, nil
}

func hold(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}
