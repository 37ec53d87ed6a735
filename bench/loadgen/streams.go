package main

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"time"
)

// streamsConfig drives `streams` mode: N users, each with its own stream, all
// posting one turn at the same moment.
type streamsConfig struct {
	base               string
	streams            int
	bundle             string
	promptSize         int
	expectDeltas       int // deltas a complete turn should carry; 0 skips the check
	turnTimeout        time.Duration
	readyTimeout       time.Duration
	connectConcurrency int
	streamPrefix       string
}

type streamsResult struct {
	Mode          string      `json:"mode"`
	Streams       int         `json:"streams"`
	StreamsOpened int         `json:"streams_opened"`
	Completed     int         `json:"completed"`
	ShortStreams  int         `json:"short_streams"`
	ConnectS      float64     `json:"connect_s"`
	ElapsedS      float64     `json:"elapsed_s"`
	AckMs         summary     `json:"ack_ms"`
	FirstEventMs  summary     `json:"first_event_ms"`
	FirstDeltaMs  summary     `json:"first_delta_ms"`
	CompletionMs  summary     `json:"completion_ms"`
	DeltaGapMs    summary     `json:"delta_gap_ms"`
	Errors        *errorTally `json:"errors"`
	Client        clientCost  `json:"client"`
}

// streamTurn is what one stream saw of its single turn, all from t0, just
// before the POST.
type streamTurn struct {
	ack        time.Duration
	firstEvent time.Duration
	firstDelta time.Duration
	completion time.Duration
	deltas     int
	gaps       []time.Duration
	completed  bool
}

func runStreams(ctx context.Context, cfg streamsConfig) (streamsResult, error) {
	client := newHTTPClient(2*cfg.streams + 16)
	tally := newErrorTally()
	connectStart := time.Now()
	streams := openMany(ctx, client, cfg.base, cfg.streamPrefix, cfg.streams,
		cfg.connectConcurrency, cfg.readyTimeout, true, tally)
	connect := time.Since(connectStart)

	opened := 0
	for _, s := range streams {
		if s != nil {
			opened++
		}
	}

	phase("measure_start", map[string]any{"streams": opened})
	before := readUsage()
	t0 := time.Now()
	turns := fireAll(ctx, cfg, client, streams, tally)
	elapsed := time.Since(t0)
	after := readUsage()
	phase("measure_end", nil)
	closeAll(streams)

	res := buildStreamsResult(cfg, turns, tally)
	res.StreamsOpened = opened
	res.ConnectS = round3(connect.Seconds())
	res.ElapsedS = round3(elapsed.Seconds())
	res.Client = newClientCost(before, after, res.Completed)
	return res, nil
}

// openMany opens n streams, at most `concurrency` connecting at once so the
// server's listen backlog is not the thing being measured, and waits for each
// one's ready frame. A stream that fails is left nil and counted in tally.
func openMany(
	ctx context.Context, client *http.Client, base, prefix string, n, concurrency int,
	readyTimeout time.Duration, forward bool, tally *errorTally,
) []*sseStream {
	streams := make([]*sseStream, n)
	slots := make(chan struct{}, concurrency)
	var wg sync.WaitGroup
	for i := 0; i < n && ctx.Err() == nil; i++ {
		slots <- struct{}{}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			defer func() { <-slots }()
			name := fmt.Sprintf("u%d", i)
			s, err := openStream(ctx, client, base, name, prefix+"-"+name, forward)
			if err == nil {
				err = s.waitReady(readyTimeout)
				if err != nil {
					s.close()
				}
			}

			if err != nil {
				tally.add("open "+name, err)
				return
			}
			streams[i] = s
		}(i)
	}

	wg.Wait()
	return streams
}

func closeAll(streams []*sseStream) {
	for _, s := range streams {
		if s != nil {
			s.close()
		}
	}
}

// fireAll releases every stream's POST at once and collects what each saw.
func fireAll(
	ctx context.Context, cfg streamsConfig, client *http.Client,
	streams []*sseStream, tally *errorTally,
) []streamTurn {
	turns := make([]streamTurn, len(streams))
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, s := range streams {
		if s == nil {
			continue
		}

		wg.Add(1)
		go func(i int, s *sseStream) {
			defer wg.Done()
			<-start
			turn, err := oneTurn(ctx, cfg, client, s)
			if err != nil {
				tally.add(s.user, err)
			}
			turns[i] = turn
		}(i, s)
	}

	close(start)
	wg.Wait()
	return turns
}

func oneTurn(
	ctx context.Context, cfg streamsConfig, client *http.Client, s *sseStream,
) (streamTurn, error) {
	postCtx, cancel := context.WithTimeout(ctx, cfg.turnTimeout)
	defer cancel()
	t0 := time.Now()
	text := promptOf("bench stream "+s.user, cfg.promptSize)
	ack, err := submitTurn(postCtx, client, cfg.base, s, cfg.bundle, "", text)
	turn := streamTurn{ack: time.Since(t0)}
	if err != nil {
		return turn, err
	}

	err = followTurn(s, ack.TurnID, t0, t0.Add(cfg.turnTimeout), &turn)
	return turn, err
}

// followTurn records the turn's first event (whatever its route: the stream
// carries nothing else), its deltas and their spacing, and its terminal event.
func followTurn(
	s *sseStream, turnID string, t0, deadline time.Time, turn *streamTurn,
) error {
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	var lastDelta time.Time
	sawEvent := false
	for {
		select {
		case ev := <-s.events:
			if !sawEvent {
				turn.firstEvent = ev.at.Sub(t0)
				sawEvent = true
			}

			if ev.turnID != turnID {
				continue
			}

			switch ev.route {
			case routeDelta:
				if turn.deltas == 0 {
					turn.firstDelta = ev.at.Sub(t0)
				} else {
					turn.gaps = append(turn.gaps, ev.at.Sub(lastDelta))
				}
				lastDelta = ev.at
				turn.deltas++
			case routeComplete:
				turn.completion = ev.at.Sub(t0)
				turn.completed = true
				return nil
			case routeError:
				return &chatError{errorType: ev.errorType}
			}
		case <-s.done:
			return errStreamClosed
		case <-timer.C:
			return errTurnTimeout
		}
	}
}

func buildStreamsResult(cfg streamsConfig, turns []streamTurn, tally *errorTally) streamsResult {
	var acks, firstEvents, firstDeltas, completions, gaps []time.Duration
	res := streamsResult{Mode: "streams", Streams: cfg.streams, Errors: tally}
	for _, t := range turns {
		if t.ack > 0 {
			acks = append(acks, t.ack)
		}

		if !t.completed {
			continue
		}

		res.Completed++
		firstEvents = append(firstEvents, t.firstEvent)
		completions = append(completions, t.completion)
		gaps = append(gaps, t.gaps...)
		if t.deltas > 0 {
			firstDeltas = append(firstDeltas, t.firstDelta)
		}

		if cfg.expectDeltas > 0 && t.deltas < cfg.expectDeltas {
			res.ShortStreams++
		}
	}

	res.AckMs = summarize(acks)
	res.FirstEventMs = summarize(firstEvents)
	res.FirstDeltaMs = summarize(firstDeltas)
	res.CompletionMs = summarize(completions)
	res.DeltaGapMs = summarize(gaps)
	return res
}
