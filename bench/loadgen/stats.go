package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"sync"
	"syscall"
	"time"
)

// summary is a latency distribution in milliseconds.
type summary struct {
	N    int     `json:"n"`
	P50  float64 `json:"p50"`
	P95  float64 `json:"p95"`
	P99  float64 `json:"p99"`
	Max  float64 `json:"max"`
	Mean float64 `json:"mean"`
}

func summarize(samples []time.Duration) summary {
	if len(samples) == 0 {
		return summary{}
	}

	sorted := append([]time.Duration(nil), samples...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	var total time.Duration
	for _, d := range sorted {
		total += d
	}

	return summary{
		N:    len(sorted),
		P50:  ms(percentile(sorted, 0.50)),
		P95:  ms(percentile(sorted, 0.95)),
		P99:  ms(percentile(sorted, 0.99)),
		Max:  ms(sorted[len(sorted)-1]),
		Mean: ms(total / time.Duration(len(sorted))),
	}
}

// percentile uses the nearest-rank method on sorted samples.
func percentile(sorted []time.Duration, q float64) time.Duration {
	rank := int(math.Ceil(q*float64(len(sorted)))) - 1
	if rank < 0 {
		rank = 0
	}
	return sorted[rank]
}

func ms(d time.Duration) float64 {
	return math.Round(float64(d)/float64(time.Microsecond)) / 1000
}

// errorTally counts errors by kind and keeps the first few messages, so a
// report says what went wrong without growing with the error count.
type errorTally struct {
	mu      sync.Mutex
	Total   int            `json:"total"`
	ByKind  map[string]int `json:"by_kind"`
	Samples []string       `json:"samples"`
}

const maxErrorSamples = 8

func newErrorTally() *errorTally {
	return &errorTally{ByKind: map[string]int{}, Samples: []string{}}
}

func (t *errorTally) add(context string, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.Total++
	t.ByKind[errorKind(err)]++
	if len(t.Samples) < maxErrorSamples {
		t.Samples = append(t.Samples, context+": "+truncate(err.Error(), 300))
	}
}

// cpuUsage is this process's user+system CPU time and peak RSS, from
// getrusage, so every report can put the client's cost beside the server's.
type cpuUsage struct {
	cpu      time.Duration
	maxRSSKB int64
}

func readUsage() cpuUsage {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return cpuUsage{}
	}
	cpu := time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	return cpuUsage{cpu: cpu, maxRSSKB: ru.Maxrss}
}

// clientCost is the client's CPU over the measured window and over its whole
// life (connecting streams and warm-up included).
type clientCost struct {
	CPUMs        float64 `json:"cpu_ms"`
	CPUMsPerItem float64 `json:"cpu_ms_per_item,omitempty"`
	CPUMsTotal   float64 `json:"cpu_ms_total"`
	MaxRSSKB     int64   `json:"maxrss_kb"`
}

func newClientCost(start, end cpuUsage, items int) clientCost {
	cost := clientCost{
		CPUMs:      ms(end.cpu - start.cpu),
		CPUMsTotal: ms(end.cpu),
		MaxRSSKB:   end.maxRSSKB,
	}
	if items > 0 {
		cost.CPUMsPerItem = round3(cost.CPUMs / float64(items))
	}
	return cost
}

func round3(x float64) float64 { return math.Round(x*1000) / 1000 }

// phaseOut is where phase lines go; tests silence it.
var phaseOut io.Writer = os.Stderr

// phase tells the runner on stderr where the measured window starts and ends,
// so it can sample the server's CPU and RSS at the same moments.
func phase(name string, fields map[string]any) {
	line := map[string]any{"phase": name, "t": float64(time.Now().UnixNano()) / 1e9}
	for k, v := range fields {
		line[k] = v
	}

	b, _ := json.Marshal(line)
	fmt.Fprintln(phaseOut, string(b))
}

// raiseFileLimit lifts the soft RLIMIT_NOFILE to the hard one: idle mode
// holds one socket per stream.
func raiseFileLimit() {
	var lim syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) != nil {
		return
	}

	lim.Cur = lim.Max
	_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
}
