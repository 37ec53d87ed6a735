module kdcube.local/bench/loadgen

go 1.19
