package main

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// turnsConfig drives `turns` mode: C users, each with its own stream, posting
// turns back to back.
type turnsConfig struct {
	base            string
	users           int
	duration        time.Duration // measured window; 0 means until turns run out
	turns           int           // total measured turns across users; 0 means no cap
	warmupTurns     int           // per user, before the window, not counted
	turnTimeout     time.Duration
	readyTimeout    time.Duration
	bundle          string
	promptSize      int
	newConversation bool // omit conversation_id on every turn
	waitIdle        bool // also wait for conv_status after the terminal event
	streamPrefix    string
	userPrefix      string // user ids are userPrefix + index; "" means "u"
}

type turnsResult struct {
	Mode            string      `json:"mode"`
	Users           int         `json:"users"`
	UsersStarted    int         `json:"users_started"`
	Turns           int         `json:"turns"`
	ElapsedS        float64     `json:"elapsed_s"`
	TurnsPerS       float64     `json:"turns_per_s"`
	FirstDeltaMs    summary     `json:"first_delta_ms"`
	FinalMs         summary     `json:"final_ms"`
	TurnsNoDelta    int         `json:"turns_without_delta"`
	Errors          *errorTally `json:"errors"`
	Client          clientCost  `json:"client"`
	ClientPerTurnMs float64     `json:"client_cpu_ms_per_turn"`
}

// turnTiming is one measured turn, both durations from just before the POST.
type turnTiming struct {
	firstDelta time.Duration
	final      time.Duration
	hasDelta   bool
}

// user is one simulated user: its stream, its conversation and its turns.
type user struct {
	cfg            *turnsConfig
	client         *http.Client
	name           string
	stream         *sseStream
	conversationID string
	reopens        int
	timings        []turnTiming
	errors         *errorTally
	seq            int
}

const maxReopens = 3

func runTurns(ctx context.Context, cfg turnsConfig) (turnsResult, error) {
	if cfg.duration <= 0 && cfg.turns <= 0 {
		return turnsResult{}, fmt.Errorf("turns mode needs -duration or -turns")
	}

	client := newHTTPClient(2*cfg.users + 16)
	tally := newErrorTally()
	prefix := cfg.userPrefix
	if prefix == "" {
		prefix = "u"
	}
	users := make([]*user, cfg.users)
	for i := range users {
		users[i] = &user{cfg: &cfg, client: client, name: fmt.Sprintf("%s%d", prefix, i), errors: tally}
	}

	started := warmUp(ctx, users)
	phase("measure_start", map[string]any{"users": started})
	before := readUsage()
	t0 := time.Now()
	measure(ctx, cfg, users)
	elapsed := time.Since(t0)
	after := readUsage()
	phase("measure_end", nil)

	for _, u := range users {
		if u.stream != nil {
			u.stream.close()
		}
	}
	return buildTurnsResult(cfg, users, started, elapsed, before, after, tally), nil
}

// warmUp opens every user's stream and runs its warm-up turns, all users in
// parallel; it returns how many users are ready for the measured window.
func warmUp(ctx context.Context, users []*user) int {
	var wg sync.WaitGroup
	var ready atomic.Int64
	for _, u := range users {
		wg.Add(1)
		go func(u *user) {
			defer wg.Done()
			if u.ensureStream(ctx) != nil {
				return
			}

			for i := 0; i < u.cfg.warmupTurns; i++ {
				if _, err := u.turn(ctx); err != nil {
					u.errors.add("warmup "+u.name, err)
				}
			}
			ready.Add(1)
		}(u)
	}

	wg.Wait()
	for _, u := range users {
		// Warm-up timings are not part of the result.
		u.timings = u.timings[:0]
	}
	return int(ready.Load())
}

// measure runs every user until the window closes or the turn budget is spent.
// A turn started before the deadline runs to its end, so the window is
// "until the last user finished", which turns/s divides by.
func measure(ctx context.Context, cfg turnsConfig, users []*user) {
	deadline := time.Now().Add(cfg.duration)
	var claimed atomic.Int64
	more := func() bool {
		if ctx.Err() != nil {
			return false
		}

		if cfg.duration > 0 && time.Now().After(deadline) {
			return false
		}
		return cfg.turns <= 0 || claimed.Add(1) <= int64(cfg.turns)
	}

	var wg sync.WaitGroup
	for _, u := range users {
		if u.stream == nil {
			continue
		}

		wg.Add(1)
		go func(u *user) {
			defer wg.Done()
			u.loop(ctx, more)
		}(u)
	}
	wg.Wait()
}

func (u *user) loop(ctx context.Context, more func() bool) {
	for more() {
		if err := u.ensureStream(ctx); err != nil {
			return
		}

		timing, err := u.turn(ctx)
		if err != nil {
			u.errors.add(u.name, err)
			continue
		}
		u.timings = append(u.timings, timing)
	}
}

// ensureStream (re)opens the user's stream, at most maxReopens times after the
// first, and waits for its ready frame.
func (u *user) ensureStream(ctx context.Context) error {
	if u.stream != nil && u.stream.alive() {
		return nil
	}

	if u.stream != nil {
		u.stream.close()
		u.stream = nil
		if u.reopens >= maxReopens {
			return errStreamClosed
		}
		u.reopens++
	}

	streamID := fmt.Sprintf("%s-%s", u.cfg.streamPrefix, u.name)
	s, err := openStream(ctx, u.client, u.cfg.base, u.name, streamID, true)
	if err == nil {
		err = s.waitReady(u.cfg.readyTimeout)
		if err != nil {
			s.close()
		}
	}

	if err != nil {
		u.errors.add("open "+u.name, err)
		return err
	}

	u.stream = s
	return nil
}

// turn posts one prompt and waits for its terminal event on the user's stream.
func (u *user) turn(ctx context.Context) (turnTiming, error) {
	s := u.stream
	s.drain()
	u.seq++
	conversationID := u.conversationID
	if u.cfg.newConversation {
		conversationID = ""
	}

	text := promptOf(fmt.Sprintf("bench %s turn %d", u.name, u.seq), u.cfg.promptSize)
	postCtx, cancel := context.WithTimeout(ctx, u.cfg.turnTimeout)
	defer cancel()
	t0 := time.Now()
	ack, err := submitTurn(postCtx, u.client, u.cfg.base, s, u.cfg.bundle, conversationID, text)
	if err != nil {
		return turnTiming{}, err
	}

	u.conversationID = ack.ConversationID
	timing, err := awaitTurn(s, ack.TurnID, t0, t0.Add(u.cfg.turnTimeout))
	if err == nil && u.cfg.waitIdle {
		err = awaitConvStatus(s, t0.Add(u.cfg.turnTimeout))
	}
	return timing, err
}

// awaitTurn reads the stream until turnID's terminal event. Events of other
// turns (stragglers of an earlier, timed-out turn) are skipped.
func awaitTurn(s *sseStream, turnID string, t0, deadline time.Time) (turnTiming, error) {
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	var timing turnTiming
	for {
		select {
		case ev := <-s.events:
			if ev.turnID != turnID {
				continue
			}

			switch ev.route {
			case routeDelta:
				if !timing.hasDelta {
					timing.firstDelta = ev.at.Sub(t0)
					timing.hasDelta = true
				}
			case routeComplete:
				timing.final = ev.at.Sub(t0)
				return timing, nil
			case routeError:
				return timing, &chatError{errorType: ev.errorType}
			}
		case <-s.done:
			return timing, errStreamClosed
		case <-timer.C:
			return timing, errTurnTimeout
		}
	}
}

// awaitConvStatus waits for the conv_status that follows a terminal event.
func awaitConvStatus(s *sseStream, deadline time.Time) error {
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	for {
		select {
		case ev := <-s.events:
			if ev.route == routeConvStatus {
				return nil
			}
		case <-s.done:
			return errStreamClosed
		case <-timer.C:
			return errTurnTimeout
		}
	}
}

func buildTurnsResult(
	cfg turnsConfig, users []*user, started int, elapsed time.Duration,
	before, after cpuUsage, tally *errorTally,
) turnsResult {
	var firstDeltas, finals []time.Duration
	noDelta := 0
	for _, u := range users {
		for _, t := range u.timings {
			finals = append(finals, t.final)
			if t.hasDelta {
				firstDeltas = append(firstDeltas, t.firstDelta)
			} else {
				noDelta++
			}
		}
	}

	res := turnsResult{
		Mode:         "turns",
		Users:        cfg.users,
		UsersStarted: started,
		Turns:        len(finals),
		ElapsedS:     round3(elapsed.Seconds()),
		FirstDeltaMs: summarize(firstDeltas),
		FinalMs:      summarize(finals),
		TurnsNoDelta: noDelta,
		Errors:       tally,
		Client:       newClientCost(before, after, len(finals)),
	}
	if elapsed > 0 {
		res.TurnsPerS = round3(float64(len(finals)) / elapsed.Seconds())
	}
	res.ClientPerTurnMs = res.Client.CPUMsPerItem
	return res
}
