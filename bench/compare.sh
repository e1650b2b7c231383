#!/usr/bin/env bash
# Side-by-side benchmark of fleetlb, nginx and HAProxy on this machine, same backends, same load.
#
#   bench/compare.sh [scenario ...]      scenarios: throughput burst hetero failover memory probes tool
#                                        https rules slow accesslog grpc (default: all)
#
# Needs: nginx (Debian nginx-light), haproxy, wrk, python3, curl, openssl; installs none of them:
#   apt-get install -y nginx-light haproxy wrk curl openssl
# Every process listens on 127.0.0.1 only and everything started here is stopped on exit.
# Environment: DURATION (seconds per run, default 10), CONNS (wrk connections, default 64),
# RUNS (interleaved throughput runs per target, default 3; the median is reported), WORKERS
# (threads or worker processes of each proxy, the same for all three: a number, or auto = one
# per core, each proxy's own default; default auto).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
RUNS=${RUNS:-3}
WORKERS=${WORKERS:-auto}
case $WORKERS in auto | [1-9] | [1-9][0-9]) ;; *) echo "bench/compare.sh: WORKERS must be auto or 1-99" >&2; exit 64 ;; esac
SCENARIOS=("$@")
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
# HAProxy needs two descriptors per connection and refuses to start beyond the limit.
HAPROXY_MAXCONN=$(( ($(ulimit -n) - 200) / 2 )); [ "$HAPROXY_MAXCONN" -gt 20000 ] && HAPROXY_MAXCONN=20000
[ ${#SCENARIOS[@]} -eq 0 ] && SCENARIOS=(throughput burst hetero failover memory probes tool https rules slow accesslog grpc)

for tool in nginx haproxy wrk python3 curl openssl; do
  command -v "$tool" >/dev/null || { echo "bench/compare.sh: $tool is missing (apt-get install -y nginx-light haproxy wrk curl openssl)" >&2; exit 64; }
done

# FLEETLB=path/to/fleetlb benchmarks that binary instead of building this checkout.
if [ -z "${FLEETLB:-}" ]; then
  cargo build --release -q
  FLEETLB=$PWD/target/release/fleetlb
fi
WORK=$(mktemp -d /tmp/fleetlb-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

BASE=19000
FLEET_PORT=19100; FLEET_ADMIN=19101; FLEET_TLS=19102; BASE_PORT=19103; BASE_ADMIN=19104; NGINX_PORT=19200; NGINX_TLS=19201; HAPROXY_PORT=19300

wait_port() { # port
  for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "port $1 never opened" >&2; exit 1
}

start_backends() { # latency_ms... ; sets ports=(...) and victim (the first backend's pid)
  local i=1
  ports=()
  for lat in "$@"; do
    local port=$((BASE + i))
    "$FLEETLB" backend --id "b$i" --cluster bench --port "$port" --latency-ms "$lat" --concurrency 100000 >/dev/null 2>&1 &
    PIDS+=($!); ports+=("$port"); i=$((i + 1))
    [ "$i" -eq 2 ] && victim=$!
  done
  for p in "${ports[@]}"; do wait_port "$p"; done
}

start_profile_backends() { # profile count ; like start_backends, each mimicking an instance type
  local i
  ports=()
  for i in $(seq 1 "$2"); do
    local port=$((BASE + i))
    "$FLEETLB" backend --id "b$i" --cluster bench --port "$port" --profile "$1" >/dev/null 2>&1 &
    PIDS+=($!); ports+=("$port")
  done
  for p in "${ports[@]}"; do wait_port "$p"; done
}

start_fleetlb() { # ports...
  start_fleetlb_as "$FLEETLB" fleetlb $FLEET_PORT $FLEET_ADMIN "$@"
  FLEET_PID=$STARTED_PID
}

start_fleetlb_as() { # binary name port admin_port ports... ; sets STARTED_PID (FLEET_ROUTE, FLEET_PROTOCOL: the cluster's route and protocol)
  local bin=$1 name=$2 port=$3 admin=$4
  shift 4
  mkdir -p "$WORK/$name"
  rm -f "$WORK/$name/"*.yaml
  {
    echo "apiVersion: fleetlb.dev/v1alpha1"
    echo "kind: BackendCluster"
    echo "metadata: {name: bench}"
    echo "spec:"
    echo "  route: ${FLEET_ROUTE:-/bench}"
    [ -n "${FLEET_PROTOCOL:-}" ] && echo "  protocol: $FLEET_PROTOCOL"
    echo "  replicas: $#"
    echo "  instanceType: t2.micro"
    echo "  healthCheck: {intervalSeconds: 1}"
    echo "  provider:"
    echo "    static:"
    echo "      endpoints:"
    for p in "$@"; do echo "      - 127.0.0.1:$p"; done
  } > "$WORK/$name/bench.yaml"
  # shellcheck disable=SC2086
  RUST_LOG=warn "$bin" standalone --config "$WORK/$name" --listen 127.0.0.1:$port --admin 127.0.0.1:$admin $([ "$WORKERS" = auto ] || echo "--proxy-threads $WORKERS") ${FLEETLB_ARGS:-} 2>"$WORK/$name.log" &
  STARTED_PID=$!; PIDS+=($STARTED_PID)
  wait_port $port
  wait_healthy "$#" 200 0.1 $admin
}

wait_healthy() { # count tries interval [admin_port]: until fleetlb reports COUNT endpoints passing health checks
  for _ in $(seq 1 "$2"); do
    n=$(curl -s 127.0.0.1:${4:-$FLEET_ADMIN}/debug/endpoints | grep -c '"state": "healthy"' || true)
    [ "$n" -ge "$1" ] && return 0; sleep "$3"
  done
  echo "fleetlb: $1 endpoints never became healthy" >&2; exit 1
}

start_nginx() { # ports... ; NGINX_DIR (default $WORK/nginx), NGINX_ACCESS_LOG (a file: logged there, JSON), NGINX_GRPC (set: h2c and grpc_pass)
  local dir=${NGINX_DIR:-$WORK/nginx}
  mkdir -p "$dir"
  {
    echo "worker_processes $WORKERS; daemon off; pid $dir/nginx.pid; error_log $dir/error.log warn;"
    echo "events { worker_connections 20000; }"
    if [ -n "${NGINX_ACCESS_LOG:-}" ]; then
      # About the fields fleetlb logs, as JSON, buffered as nginx users run it.
      echo "http { log_format json escape=json '{\"time\":\"\$time_iso8601\",\"client\":\"\$remote_addr:\$remote_port\",\"method\":\"\$request_method\",\"host\":\"\$host\",\"path\":\"\$request_uri\",\"protocol\":\"\$server_protocol\",\"status\":\$status,\"bytes_in\":\$request_length,\"bytes_out\":\$body_bytes_sent,\"duration\":\$request_time,\"upstream_connect\":\"\$upstream_connect_time\",\"upstream_head\":\"\$upstream_header_time\",\"endpoint\":\"\$upstream_addr\",\"request_id\":\"\$request_id\",\"user_agent\":\"\$http_user_agent\"}';"
      echo "  access_log $NGINX_ACCESS_LOG json buffer=64k flush=1s;"
    else
      echo "http { access_log off;"
    fi
    echo "  client_body_temp_path $dir; proxy_temp_path $dir;"
    echo "  fastcgi_temp_path $dir; uwsgi_temp_path $dir; scgi_temp_path $dir;"
    echo "  upstream up { ${NGINX_BALANCE:-}"
    for p in "$@"; do echo "    server 127.0.0.1:$p max_fails=1 fail_timeout=10s;"; done
    echo "    keepalive 256; }"
    # The same request headers fleetlb adds by default, so all three do the same work.
    if [ -n "${NGINX_GRPC:-}" ]; then
      echo "  server { listen 127.0.0.1:$NGINX_PORT http2 backlog=4096; keepalive_requests 1000000;"
      echo "    location / { grpc_pass grpc://up; grpc_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;"
      echo "      grpc_set_header X-Forwarded-Proto \$scheme; grpc_set_header X-Forwarded-Host \$host;"
      echo "      grpc_set_header X-Request-Id \$request_id; } }"
    else
      echo "  server { listen 127.0.0.1:$NGINX_PORT backlog=4096; keepalive_requests 1000000;"
      echo "    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\";"
      echo "      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto \$scheme;"
      echo "      proxy_set_header X-Forwarded-Host \$host; proxy_set_header X-Request-Id \$request_id; } }"
    fi
    if [ -n "${NGINX_TLS_CERT:-}" ]; then
      # HTTPS with the certificate fleetlb serves, the same protocol versions (TLS 1.2 and 1.3).
      echo "  server { listen 127.0.0.1:$NGINX_TLS ssl backlog=4096; keepalive_requests 1000000;"
      echo "    ssl_certificate $NGINX_TLS_CERT; ssl_certificate_key $NGINX_TLS_KEY; ssl_protocols TLSv1.2 TLSv1.3;"
      echo "    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\";"
      echo "      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto \$scheme;"
      echo "      proxy_set_header X-Forwarded-Host \$host; proxy_set_header X-Request-Id \$request_id; } }"
    fi
    echo "}"
  } > "$dir/nginx.conf"
  nginx -p "$dir" -c "$dir/nginx.conf" &
  NGINX_PID=$!; PIDS+=($NGINX_PID)
  wait_port $NGINX_PORT
}

start_haproxy() { # ports... ; HAPROXY_H2 (set: HTTP/2 both sides)
  {
    echo "global"; echo "  nbthread $([ "$WORKERS" = auto ] && nproc || echo "$WORKERS")"; echo "  maxconn $HAPROXY_MAXCONN"
    echo "defaults"; echo "  mode http"; echo "  timeout connect 1s"; echo "  timeout client 30s"; echo "  timeout server 30s"
    echo "  option http-keep-alive"; echo "  http-reuse always"; echo "  retries 3"; echo "  option redispatch"
    echo "  retry-on conn-failure empty-response"
    local h2=""; [ -n "${HAPROXY_H2:-}" ] && h2=" proto h2"
    echo "frontend f"; echo "  bind 127.0.0.1:$HAPROXY_PORT$h2"; echo "  default_backend b"
    # The same request headers fleetlb adds by default, so all three do the same work.
    echo "  option forwardfor"; echo "  http-request set-header X-Forwarded-Proto http"
    echo "  http-request set-header X-Forwarded-Host %[req.hdr(host)]"; echo "  http-request set-header X-Request-Id %[uuid]"
    echo "backend b"; echo "  balance roundrobin"
    i=1; for p in "$@"; do echo "  server s$i 127.0.0.1:$p$h2 check inter 1s fall 2 rise 2"; i=$((i + 1)); done
  } > "$WORK/haproxy.cfg"
  haproxy -f "$WORK/haproxy.cfg" -db 2>"$WORK/haproxy.log" &
  HAPROXY_PID=$!; PIDS+=($HAPROXY_PID)
  wait_port $HAPROXY_PORT
}

stop_all() { # everything started so far; waits until the backend ports are free again
  for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=()
  for port in $(seq $((BASE + 1)) $((BASE + 8))); do
    for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null || break; sleep 0.05; done
  done
}

# wrk -> "req/s p50_ms p99_ms"
tree_sum() { # file awk_program pids... -> sum of what awk_program prints for /proc/PID/FILE
  local file=$1 prog=$2 total=0 v
  shift 2
  for p in "$@"; do
    for q in $p $(pgrep -P "$p" || true); do
      v=$(awk "$prog" /proc/"$q"/"$file" 2>/dev/null || echo 0); total=$((total + ${v:-0}))
    done
  done
  echo $total
}
cpu_ticks() { tree_sum stat '{print $14 + $15}' "$@"; } # user+system clock ticks so far
rss_kb() { tree_sum status '/VmRSS/ {print $2}' "$@"; } # resident KiB

# wrk (after a 1 s warm-up) and the CPU the process PID (and its children) spent per request
# meanwhile -> "req/s p50_ms p99_ms cpu_us_per_request"
wrk_run() { # url pid [wrk args...]
  local url=$1 pid=$2
  shift 2
  wrk -t2 -c"$CONNS" -d1s "$@" "$url" >/dev/null 2>&1 # warm-up
  local before after out
  before=$(cpu_ticks "$pid")
  out=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency "$@" "$url" 2>/dev/null)
  after=$(cpu_ticks "$pid")
  echo "$out" | awk -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /Requests\/sec/ { rps = $2 } / requests in / { n = $1 }
    $1 == "50%" { p50 = ms($2) } $1 == "99%" { p99 = ms($2) }
    END { printf "%.0f %.3f %.3f %.1f\n", rps, p50, p99, (n > 0 ? ticks * 1e6 / hz / n : 0) }'
}

# fleetlb bench open loop -> "p50_ms p99_ms errors"
rate_run() { # target rate [extra args]
  local out="$WORK/run-$RANDOM"
  # Warm-up (discarded): connections open, estimates settle, for every target alike.
  "$FLEETLB" bench --target "$1" --path /bench --rate "$2" --duration 2s -c 256 --max-error-rate 1 >/dev/null 2>&1
  "$FLEETLB" bench --target "$1" --path /bench --rate "$2" --duration "${DURATION}s" -c 256 --out "$out" --max-error-rate 1 >/dev/null 2>&1
  python3 -c "import json,sys; p=json.load(open('$out/summary.json'))['paths'][0]; print('%.3f %.3f %d' % (p['latency_ms']['p50'], p['latency_ms']['p99'], p['failed']))"
}

hold_connections() { # port count [tls] -> keeps COUNT keep-alive connections open until killed
  rm -f "$WORK/held"
  python3 - "$1" "$2" "$WORK/held" "${3:-}" <<'PY' &
import socket, ssl, sys, time
port, n, tls = int(sys.argv[1]), int(sys.argv[2]), sys.argv[4] == "tls"
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    if tls:
        s = ctx.wrap_socket(s, server_hostname="bench.local")
    s.sendall(b"GET /bench HTTP/1.1\r\nHost: x\r\n\r\n")
    s.recv(4096)
    socks.append(s)
open(sys.argv[3], "w").close()
time.sleep(3600)
PY
  HOLD_PID=$!
}

# What the machine itself takes away: one process spinning on each core for 3 s with nothing
# else running; a gap over 1 ms between two clock reads is time the core was given to someone
# else (on a VM, the hypervisor). Such gaps are a floor under every p99 below.
machine_check() {
  python3 - <<'PY'
import multiprocessing as mp, os, time
def spin(cpu, q):
    os.sched_setaffinity(0, {cpu})
    t0 = last = time.perf_counter(); gaps = []
    while last - t0 < 3:
        now = time.perf_counter()
        if now - last > 0.001: gaps.append((now - last) * 1000)
        last = now
    q.put((cpu, len(gaps), max(gaps, default=0.0)))
q = mp.Queue(); cpus = sorted(os.sched_getaffinity(0))
ps = [mp.Process(target=spin, args=(c, q)) for c in cpus]
for p in ps: p.start()
res = sorted(q.get() for _ in ps)
for p in ps: p.join()
print("machine check (3 s, one spinner per core, nothing else running): "
      + "; ".join("core %d lost the CPU %d times for over 1 ms, longest %.1f ms" % r for r in res))
PY
}

echo "# fleetlb vs nginx vs HAProxy on $(nproc) cores, $(date -u +%Y-%m-%d) (DURATION=${DURATION}s, CONNS=$CONNS, RUNS=$RUNS, WORKERS=$WORKERS)"
echo
machine_check
echo

for scenario in "${SCENARIOS[@]}"; do
  case "$scenario" in
  throughput)
    start_backends 0 0 0 0 0 0 0 0
    start_fleetlb "${ports[@]}"; start_nginx "${ports[@]}"; start_haproxy "${ports[@]}"
    # FLEETLB_BASELINE=path/to/an/older/fleetlb: that build too, in the same interleaved runs.
    targets=(direct fleetlb nginx haproxy)
    if [ -n "${FLEETLB_BASELINE:-}" ]; then
      start_fleetlb_as "$FLEETLB_BASELINE" baseline $BASE_PORT $BASE_ADMIN "${ports[@]}"
      targets+=(baseline)
    fi
    echo "## throughput: 8 instant backends, keep-alive, closed loop (wrk -t2 -c$CONNS), median of $RUNS interleaved runs"
    echo "| target | req/s (median) | each run | p50 ms | p99 ms | CPU µs per request |"; echo "|---|---|---|---|---|---|"
    # Targets take turns, run after run, so a machine getting busier or quieter during the
    # benchmark weighs on all of them alike; the median of each is reported.
    declare -A url=([direct]="http://127.0.0.1:${ports[0]}/bench" [fleetlb]="http://127.0.0.1:$FLEET_PORT/bench"
                    [nginx]="http://127.0.0.1:$NGINX_PORT/bench" [haproxy]="http://127.0.0.1:$HAPROXY_PORT/bench"
                    [baseline]="http://127.0.0.1:$BASE_PORT/bench")
    # CPU per request: of the proxy (its workers or threads included); for the direct row, of
    # the one backend.
    declare -A pid=([direct]=$victim [fleetlb]=$FLEET_PID [nginx]=$NGINX_PID [haproxy]=$HAPROXY_PID [baseline]=${STARTED_PID:-0})
    declare -A runs=()
    for _ in $(seq 1 "$RUNS"); do
      for t in "${targets[@]}"; do runs[$t]+="$(wrk_run "${url[$t]}" "${pid[$t]}");"; done
    done
    median() { # "rps p50 p99 cpu;..." -> "median_rps runs_list p50 p99 cpu" (the median run's)
      python3 -c "
import sys
rs = sorted((tuple(map(float, r.split())) for r in sys.argv[1].split(';') if r), key=lambda r: r[0])
m = rs[len(rs) // 2]
print('%.0f %s %.3f %.3f %.1f' % (m[0], ','.join('%.0f' % r[0] for r in rs), m[1], m[2], m[3]))" "$1"
    }
    declare -A label=([direct]="one backend, direct" [fleetlb]="fleetlb (peak-ewma)"
                      [nginx]="nginx (round robin, keepalive 256)" [haproxy]="HAProxy (roundrobin, http-reuse always)"
                      [baseline]="fleetlb baseline ($FLEETLB_BASELINE)")
    for t in "${targets[@]}"; do
      read -r m each p50 p99 cpu < <(median "${runs[$t]}")
      echo "| ${label[$t]} | $m | $each | $p50 | $p99 | $cpu |"
      [ "$t" = fleetlb ] && f_rps=$m && f_cpu=$cpu
      [ "$t" = nginx ] && n_rps=$m && n_cpu=$cpu
      [ "$t" = haproxy ] && h_rps=$m
      [ "$t" = baseline ] && b_rps=$m && b_cpu=$cpu
    done
    [ -n "${FLEETLB_BASELINE:-}" ] && python3 -c "print(); print('fleetlb / baseline: req/s %.3f, CPU per request %.3f (goal: within 5 %%)' % ($f_rps / $b_rps, $f_cpu / $b_cpu))"
    python3 -c "print(); print('fleetlb / nginx = %.2f, fleetlb / HAProxy = %.2f (goal: >= 1 and > 1)' % ($f_rps / $n_rps, $f_rps / $h_rps))"
    python3 -c "print('fleetlb CPU per request / nginx = %.2f (goal <= 1)' % ($f_cpu / $n_cpu))"
    echo
    stop_all ;;
  accesslog)
    # The same proxy with its access log off and on (to a file), nginx likewise, all four
    # running at once and taking turns run after run.
    start_backends 0 0 0 0 0 0 0 0
    start_fleetlb "${ports[@]}"
    FLEETLB_ARGS="--access-log $WORK/fleetlb-access.log" start_fleetlb_as "$FLEETLB" logged $BASE_PORT $BASE_ADMIN "${ports[@]}"
    LOGGED_PID=$STARTED_PID
    start_nginx "${ports[@]}"; NGINX_OFF_PID=$NGINX_PID
    NGINX_PORT=19202 NGINX_DIR=$WORK/nginx-logged NGINX_ACCESS_LOG=$WORK/nginx-access.log start_nginx "${ports[@]}"
    NGINX_ON_PID=$NGINX_PID
    echo "## accesslog: 8 instant backends, wrk -t2 -c$CONNS, access log off and on (a file), median of $RUNS interleaved runs"
    echo "| target | access log | req/s (median) | each run | p99 ms | CPU µs per request |"; echo "|---|---|---|---|---|---|"
    declare -A url=([f_off]="http://127.0.0.1:$FLEET_PORT/bench" [f_on]="http://127.0.0.1:$BASE_PORT/bench"
                    [n_off]="http://127.0.0.1:$NGINX_PORT/bench" [n_on]="http://127.0.0.1:19202/bench")
    declare -A pid=([f_off]=$FLEET_PID [f_on]=$LOGGED_PID [n_off]=$NGINX_OFF_PID [n_on]=$NGINX_ON_PID)
    declare -A runs=()
    for _ in $(seq 1 "$RUNS"); do
      for t in f_off f_on n_off n_on; do runs[$t]+="$(wrk_run "${url[$t]}" "${pid[$t]}");"; done
    done
    declare -A label=([f_off]="fleetlb|off" [f_on]="fleetlb|on (--access-log FILE)" [n_off]="nginx|off" [n_on]="nginx|on (JSON, buffer=64k)")
    declare -A rps=()
    for t in f_off f_on n_off n_on; do
      read -r m each p99 cpu < <(python3 -c "
import sys
rs = sorted((tuple(map(float, r.split())) for r in sys.argv[1].split(';') if r), key=lambda r: r[0])
m = rs[len(rs) // 2]
print('%.0f %s %.3f %.1f' % (m[0], ','.join('%.0f' % r[0] for r in rs), m[2], m[3]))" "${runs[$t]}")
      rps[$t]=$m
      echo "| ${label[$t]/|/ | } | $m | $each | $p99 | $cpu |"
    done
    sleep 2 # the last lines reach the files
    dropped=$(curl -s 127.0.0.1:$BASE_ADMIN/metrics | awk '/^fleetlb_access_log_dropped_total/ {print $2}')
    served=$(curl -s 127.0.0.1:$BASE_ADMIN/metrics | awk '/^fleetlb_requests_total/ {s += $2} END {print s}')
    echo
    python3 -c "print('fleetlb on / off = %.3f (goal >= 0.90); nginx on / off = %.3f' % (${rps[f_on]} / ${rps[f_off]}, ${rps[n_on]} / ${rps[n_off]}))"
    echo "fleetlb: $served requests answered, $(wc -l < "$WORK/fleetlb-access.log") lines written, ${dropped:-0} dropped; nginx: $(wc -l < "$WORK/nginx-access.log") lines"
    echo "a fleetlb line: $(tail -1 "$WORK/fleetlb-access.log")"
    echo
    stop_all ;;
  hetero)
    RATE=${RATE:-1000}
    start_backends 2 2 2 40
    echo "## hetero: 3 backends at 2 ms, 1 at 40 ms, $RATE req/s open loop (fleetlb bench --rate)"
    echo "| target | p50 ms | p99 ms | errors |"; echo "|---|---|---|---|"
    start_nginx "${ports[@]:0:3}"
    read -r a fast99 c < <(rate_run "http://127.0.0.1:$NGINX_PORT" "$RATE"); echo "| baseline: only the 3 fast backends (nginx) | $a | $fast99 | $c |"
    stop_all; start_backends 2 2 2 40
    start_fleetlb "${ports[@]}"; start_nginx "${ports[@]}"; start_haproxy "${ports[@]}"
    read -r a f99 c < <(rate_run "http://127.0.0.1:$FLEET_PORT" "$RATE"); echo "| fleetlb (peak-ewma) | $a | $f99 | $c |"
    read -r a n99 c < <(rate_run "http://127.0.0.1:$NGINX_PORT" "$RATE"); echo "| nginx (round robin) | $a | $n99 | $c |"
    read -r a h99 c < <(rate_run "http://127.0.0.1:$HAPROXY_PORT" "$RATE"); echo "| HAProxy (roundrobin) | $a | $h99 | $c |"
    echo; python3 -c "print('fleetlb p99 / fast-only p99 = %.2f (goal <= 1.3); fleetlb p99 / nginx p99 = %.2f (goal <= 0.33)' % ($f99/$fast99, $f99/$n99))"
    echo
    stop_all ;;
  failover)
    RATE=${RATE:-2000}
    echo "## failover: 4 backends (1 ms), one killed after 3 s, $RATE req/s for ${DURATION}s"
    echo "| target | requests failed |"; echo "|---|---|"
    for target in fleetlb nginx haproxy; do
      start_backends 1 1 1 1
      case $target in
        fleetlb) start_fleetlb "${ports[@]}"; port=$FLEET_PORT ;;
        nginx) start_nginx "${ports[@]}"; port=$NGINX_PORT ;;
        haproxy) start_haproxy "${ports[@]}"; port=$HAPROXY_PORT ;;
      esac
      ( sleep 5; kill -9 "$victim" ) &  # 2 s warm-up, then 3 s into the measured run
      read -r a b errors < <(rate_run "http://127.0.0.1:$port" "$RATE")
      echo "| $target | $errors of $((RATE * DURATION)) |"
      stop_all
    done
    echo ;;
  memory)
    HOLD=${HOLD:-10000}
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench.local \
      -addext subjectAltName=DNS:bench.local -keyout "$WORK/tls.key" -out "$WORK/tls.crt" 2>/dev/null
    start_backends 0 0
    echo "## memory: RSS with $HOLD idle keep-alive client connections (each made one request), 3 s after the last"
    echo "| target | RSS idle (MiB) | RSS with $HOLD connections (MiB) | KiB per connection |"; echo "|---|---|---|---|"
    FLEETLB_ARGS="${FLEETLB_ARGS:-} --tls-listen 127.0.0.1:$FLEET_TLS --tls-cert $WORK/tls.crt --tls-key $WORK/tls.key" start_fleetlb "${ports[@]}"
    NGINX_TLS_CERT=$WORK/tls.crt NGINX_TLS_KEY=$WORK/tls.key start_nginx "${ports[@]}"; start_haproxy "${ports[@]}"
    wait_port $FLEET_TLS; wait_port $NGINX_TLS
    declare -A per=()
    for t in "fleetlb $FLEET_PID $FLEET_PORT" "nginx $NGINX_PID $NGINX_PORT" "haproxy $HAPROXY_PID $HAPROXY_PORT" \
             "fleetlb-tls $FLEET_PID $FLEET_TLS tls" "nginx-tls $NGINX_PID $NGINX_TLS tls"; do
      set -- $t
      n=$HOLD
      # HAProxy's maxconn is bounded by this machine's descriptor limit (see HAPROXY_MAXCONN).
      [ "$1" = haproxy ] && [ "$n" -gt $((HAPROXY_MAXCONN - 100)) ] && n=$((HAPROXY_MAXCONN - 100))
      idle=$(rss_kb "$2")
      hold_connections "$3" "$n" "${4:-}"
      for _ in $(seq 1 1200); do [ -e "$WORK/held" ] && break; sleep 0.1; done
      # Steady state: fleetlb parks an HTTP/1.1 connection after 5 ms idle.
      sleep 3
      busy=$(rss_kb "$2")
      kill $HOLD_PID 2>/dev/null || true; wait $HOLD_PID 2>/dev/null || true
      sleep 2 # the held connections close before the next target's idle reading
      per[$1]=$(python3 -c "print('%.1f' % (($busy - $idle) / $n))")
      echo "| $1$([ "$n" = "$HOLD" ] || echo " ($n connections: its descriptor limit here)") | $(python3 -c "print('%.1f' % ($idle/1024))") | $(python3 -c "print('%.1f' % ($busy/1024))") | ${per[$1]} |"
    done
    echo
    python3 -c "print('plain: fleetlb %s KiB per idle connection (goal <= 2), nginx %s; TLS: fleetlb %s, nginx %s' % ('${per[fleetlb]}', '${per[nginx]}', '${per[fleetlb-tls]}', '${per[nginx-tls]}'))"
    echo
    stop_all ;;
  burst)
    # The original experiment: four identical t2.micro-like instances (6 ms, 4 requests at a
    # time), 1000 requests from 1000 connections at once, ten runs in a row.
    BURSTS=${BURSTS:-10}
    start_profile_backends t2.micro 4
    start_fleetlb "${ports[@]}"; NGINX_BALANCE="least_conn;" start_nginx "${ports[@]}"
    echo "## burst: 4 identical t2.micro-like backends, fleetlb bench -n 1000 -c 1000, $BURSTS runs each, interleaved"
    echo "| run | fleetlb shares % | fleetlb wall s | nginx least_conn shares % | nginx wall s |"; echo "|---|---|---|---|---|"
    burst_run() { # port -> "share,share,share,share wall"
      local out="$WORK/burst-$RANDOM"
      "$FLEETLB" bench --target "http://127.0.0.1:$1" --path /bench -n 1000 -c 1000 --out "$out" --max-error-rate 1 >/dev/null 2>&1
      python3 -c "
import json; p = json.load(open('$out/summary.json'))['paths'][0]
s = sorted(i['share'] * 100 for i in p['instances']) + [0.0] * (4 - len(p['instances']))
print(','.join('%.1f' % x for x in s), '%.3f' % p['wall_s'], p['failed'])"
    }
    f_all=(); f_walls=(); n_walls=()
    for r in $(seq 1 "$BURSTS"); do
      read -r fs fw ff < <(burst_run $FLEET_PORT)
      read -r ns nw nf < <(burst_run $NGINX_PORT)
      echo "| $r | $fs | $fw | $ns | $nw |"
      f_all+=("$fs"); f_walls+=("$fw"); n_walls+=("$nw")
      [ "$ff" = 0 ] && [ "$nf" = 0 ] || echo "(run $r: failed requests: fleetlb $ff, nginx $nf)"
    done
    python3 -c "
import statistics as st
shares = [float(x) for r in '${f_all[*]}'.split() for x in r.split(',')]
fw = [float(x) for x in '${f_walls[*]}'.split()]; nw = [float(x) for x in '${n_walls[*]}'.split()]
print()
print('fleetlb shares over all runs: %.1f-%.1f %% (goal: every share within 20-30 %%)' % (min(shares), max(shares)))
print('median wall: fleetlb %.3f s, nginx least_conn %.3f s (goal: fleetlb <= nginx)' % (st.median(fw), st.median(nw)))"
    echo
    stop_all ;;
  probes)
    # Health checking alone, no traffic: 200 clusters x 8 static endpoints, probed every 2 s
    # (800 probes/s), then the CPU of one proxied request on the same process for comparison.
    CLUSTERS=${CLUSTERS:-200}
    start_backends 0 0 0 0 0 0 0 0
    mkdir -p "$WORK/probes"
    for c in $(seq 1 "$CLUSTERS"); do
      {
        echo "apiVersion: fleetlb.dev/v1alpha1"; echo "kind: BackendCluster"; echo "metadata: {name: p$c}"
        echo "spec:"; echo "  route: /p$c"; echo "  replicas: 8"; echo "  instanceType: t2.micro"
        echo "  healthCheck: {intervalSeconds: 2}"; echo "  provider:"; echo "    static:"; echo "      endpoints:"
        for p in "${ports[@]}"; do echo "      - 127.0.0.1:$p"; done
      } > "$WORK/probes/p$c.yaml"
    done
    RUST_LOG=warn "$FLEETLB" standalone --config "$WORK/probes" --listen 127.0.0.1:$FLEET_PORT --admin 127.0.0.1:$FLEET_ADMIN 2>"$WORK/probes.log" &
    FLEET_PID=$!; PIDS+=($FLEET_PID)
    wait_port $FLEET_PORT
    endpoints=$((CLUSTERS * 8))
    wait_healthy "$endpoints" 300 0.2
    sleep 3 # past the first, faster, probes of new endpoints
    before=$(cpu_ticks $FLEET_PID); sleep "$DURATION"; after=$(cpu_ticks $FLEET_PID)
    per_probe=$(python3 -c "print('%.1f' % (($after - $before) * 1e6 / $(getconf CLK_TCK) / ($endpoints / 2.0 * $DURATION)))")
    read -r _ _ _ per_req < <(wrk_run "http://127.0.0.1:$FLEET_PORT/p1" "$FLEET_PID")
    echo "## probes: $endpoints endpoints ($CLUSTERS clusters x 8) probed every 2 s, no traffic"
    echo "| CPU µs per probe | CPU µs per proxied request (wrk, same process, probes running) |"; echo "|---|---|"
    echo "| $per_probe | $per_req |"
    echo; python3 -c "print('CPU per probe / per proxied request = %.2f (goal <= 1)' % ($per_probe / $per_req))"
    echo
    stop_all ;;
  tool)
    start_backends 0
    echo "## tool: fleetlb bench vs wrk against one instant backend, $CONNS connections, ${DURATION}s closed loop"
    echo "| load generator | req/s |"; echo "|---|---|"
    read -r w_rps _ _ _ < <(wrk_run "http://127.0.0.1:${ports[0]}/bench" "$victim"); echo "| wrk -t2 -c$CONNS | $w_rps |"
    out="$WORK/tool"
    "$FLEETLB" bench --target "http://127.0.0.1:${ports[0]}" --path /bench -c "$CONNS" --duration "${DURATION}s" --out "$out" >/dev/null 2>&1
    b_rps=$(python3 -c "import json; print('%.0f' % json.load(open('$out/summary.json'))['paths'][0]['throughput_rps'])")
    echo "| fleetlb bench -c $CONNS | $b_rps |"
    echo
    stop_all ;;
  https)
    # TLS termination: the same certificate (ECDSA P-256) in fleetlb and nginx, keep-alive
    # HTTP/1.1 over TLS from wrk, 8 instant backends behind.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench.local \
      -addext subjectAltName=DNS:bench.local -keyout "$WORK/tls.key" -out "$WORK/tls.crt" 2>/dev/null
    start_backends 0 0 0 0 0 0 0 0
    FLEETLB_ARGS="${FLEETLB_ARGS:-} --tls-listen 127.0.0.1:$FLEET_TLS --tls-cert $WORK/tls.crt --tls-key $WORK/tls.key" start_fleetlb "${ports[@]}"
    NGINX_TLS_CERT=$WORK/tls.crt NGINX_TLS_KEY=$WORK/tls.key start_nginx "${ports[@]}"
    wait_port $FLEET_TLS; wait_port $NGINX_TLS
    echo "## https: TLS termination, same ECDSA P-256 certificate, keep-alive (wrk -t2 -c$CONNS), median of $RUNS interleaved runs"
    echo "| target | req/s (median) | each run | p50 ms | p99 ms | CPU µs per request |"; echo "|---|---|---|---|---|---|"
    declare -A turl=([fleetlb]="https://127.0.0.1:$FLEET_TLS/bench" [nginx]="https://127.0.0.1:$NGINX_TLS/bench")
    declare -A tpid=([fleetlb]=$FLEET_PID [nginx]=$NGINX_PID)
    declare -A truns=()
    for _ in $(seq 1 "$RUNS"); do
      for t in fleetlb nginx; do truns[$t]+="$(wrk_run "${turl[$t]}" "${tpid[$t]}");"; done
    done
    for t in fleetlb nginx; do
      read -r m each p50 p99 cpu < <(python3 -c "
import sys
rs = sorted((tuple(map(float, r.split())) for r in sys.argv[1].split(';') if r), key=lambda r: r[0])
m = rs[len(rs) // 2]
print('%.0f %s %.3f %.3f %.1f' % (m[0], ','.join('%.0f' % r[0] for r in rs), m[1], m[2], m[3]))" "${truns[$t]}")
      echo "| $t | $m | $each | $p50 | $p99 | $cpu |"
      [ "$t" = fleetlb ] && f_rps=$m && f_cpu=$cpu
      [ "$t" = nginx ] && n_rps=$m && n_cpu=$cpu
    done
    python3 -c "print(); print('HTTPS: fleetlb / nginx = %.2f req/s, CPU per request %.2fx nginx' % ($f_rps / $n_rps, $f_cpu / $n_cpu))"
    echo
    stop_all ;;
  rules)
    # Host rules: throughput on one host+path rule when the table holds it alone, then among
    # RULES rules (each its own host and path, one static endpoint: the same backend), then the
    # time to apply a RULES-rule update under that load.
    RULES=${RULES:-10000}
    start_backends 0
    gen_rules() { # dir first last host-prefix
      python3 - "$@" "${ports[0]}" <<'PY'
import os, sys
d, first, last, h, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
os.makedirs(d, exist_ok=True)
for i in range(first, last + 1):
    with open(os.path.join(d, "r%d.yaml" % i), "w") as f:
        f.write("apiVersion: fleetlb.dev/v1alpha1\nkind: BackendCluster\nmetadata: {name: r%d}\nspec:\n"
                "  route: /r%d\n  hosts: [%s%d.bench.local]\n  replicas: 1\n  instanceType: t2.micro\n"
                "  healthCheck: {intervalSeconds: 30}\n  provider: {static: {endpoints: [\"127.0.0.1:%s\"]}}\n"
                % (i, i, h, i, port))
PY
    }
    rules_fleetlb() { # dir expected-healthy
      RUST_LOG=warn "$FLEETLB" standalone --config "$1" --listen 127.0.0.1:$FLEET_PORT --admin 127.0.0.1:$FLEET_ADMIN 2>"$WORK/rules.log" &
      FLEET_PID=$!; PIDS+=($FLEET_PID)
      wait_port $FLEET_PORT
      wait_healthy "$2" 1200 0.25
    }
    gen_rules "$WORK/rules1" 1 1 h
    rules_fleetlb "$WORK/rules1" 1
    read -r one_rps _ _ one_cpu < <(wrk_run "http://127.0.0.1:$FLEET_PORT/r1/x" "$FLEET_PID" -H "Host: h1.bench.local")
    kill "$FLEET_PID"; wait "$FLEET_PID" 2>/dev/null || true
    mid=$((RULES / 2))
    gen_rules "$WORK/rulesN" 1 "$RULES" h
    t0=$(date +%s.%N)
    rules_fleetlb "$WORK/rulesN" "$RULES"
    t_start=$(python3 -c "print('%.1f' % ($(date +%s.%N) - $t0))")
    read -r many_rps _ _ many_cpu < <(wrk_run "http://127.0.0.1:$FLEET_PORT/r$mid/x" "$FLEET_PID" -H "Host: h$mid.bench.local")
    echo "## rules: one host+path rule among 1 and among $RULES (wrk -t2 -c$CONNS on one of them)"
    echo "| rules in the table | req/s | CPU µs per request |"; echo "|---|---|---|"
    echo "| 1 | $one_rps | $one_cpu |"
    echo "| $RULES | $many_rps | $many_cpu |"
    echo; python3 -c "print('req/s with $RULES rules / with 1 = %.2f, CPU per request %.2fx (goal: within noise of 1); $RULES rules loaded and healthy in $t_start s' % ($many_rps / $one_rps, $many_cpu / $one_cpu))"
    # The update: every rule but the measured one gets a new host, under wrk load on r1.
    wrk -t2 -c"$CONNS" -d30s -H "Host: h1.bench.local" "http://127.0.0.1:$FLEET_PORT/r1/x" >"$WORK/rules-wrk.txt" 2>&1 &
    WRK_PID=$!
    sleep 3
    t0=$(date +%s.%N)
    gen_rules "$WORK/rulesN" 2 "$RULES" g
    routed="" served=""
    for _ in $(seq 1 1200); do
      code=$(curl -s -o /dev/null -w '%{http_code}' -H "Host: g$RULES.bench.local" "http://127.0.0.1:$FLEET_PORT/r$RULES/x" || true)
      [ -z "$routed" ] && [ "$code" != 404 ] && routed=$(python3 -c "print('%.1f' % ($(date +%s.%N) - $t0))")
      [ "$code" = 200 ] && served=$(python3 -c "print('%.1f' % ($(date +%s.%N) - $t0))") && break
      sleep 0.05
    done
    old=$(curl -s -o /dev/null -w '%{http_code}' -H "Host: h$RULES.bench.local" "http://127.0.0.1:$FLEET_PORT/r$RULES/x" || true)
    wait "$WRK_PID" || true
    bad=$(awk '/Non-2xx/ {print $NF} /Socket errors/ {print}' "$WORK/rules-wrk.txt" | tr '\n' ' ')
    echo "$RULES-rule update under load (files rewritten, all but the measured rule): last new rule routed after ${routed:-never} s, served (health checks passed) after ${served:-never} s; its old host now answers $old; requests on the measured rule meanwhile: $(awk '/requests in/ {print $1}' "$WORK/rules-wrk.txt"), failed: ${bad:-0}"
    echo
    stop_all ;;
  slow)
    # Slow and hostile clients (slowhttptest, Debian) against each proxy with its own defaults:
    # slowloris (headers a line at a time), slow body (R-U-D-Y) and slow read (a tiny receive
    # window on a 1 MiB answer), SLOW_CONNS connections for SLOW_SECONDS each, while a normal
    # client asks every 200 ms. Reported: failed normal requests, their p99, the proxy's peak RSS.
    SLOW_CONNS=${SLOW_CONNS:-2000}; SLOW_SECONDS=${SLOW_SECONDS:-40}; SLOW_MODES=${SLOW_MODES:-slowloris slowbody slowread}
    command -v slowhttptest >/dev/null || { echo "bench/compare.sh: slowhttptest is missing (apt-get install -y slowhttptest)" >&2; exit 64; }
    echo "## slow: slowhttptest, $SLOW_CONNS connections for ${SLOW_SECONDS}s per mode, a normal client every 200 ms"
    echo "| mode | target | normal failed | normal p99 ms | peak RSS MiB |"; echo "|---|---|---|---|---|"
    for mode in $SLOW_MODES; do
      # Fresh processes per mode: a peak is that mode's own, not one an earlier mode left
      # (neither nginx nor glibc's malloc gives memory back).
      start_backends 0 0
      start_fleetlb "${ports[@]}"; start_nginx "${ports[@]}"; start_haproxy "${ports[@]}"
      for t in "fleetlb $FLEET_PID $FLEET_PORT" "nginx $NGINX_PID $NGINX_PORT" "haproxy $HAPROXY_PID $HAPROXY_PORT"; do
        set -- $t
        url="http://127.0.0.1:$3/bench"
        case $mode in
          slowloris) args=(-H -i 10 -r 200 -t GET -u "$url" -x 24 -p 3) ;;
          slowbody) args=(-B -i 10 -r 200 -s 8192 -t POST -u "$url" -x 10 -p 3) ;;
          slowread) args=(-X -r 200 -w 512 -y 1024 -n 5 -z 32 -k 3 -u "$url/bytes/1048576" -p 3) ;;
        esac
        out="$WORK/slow-$mode-$1"
        peak="$WORK/peak-$mode-$1"; echo 0 > "$peak"
        ( while :; do r=$(rss_kb "$2"); [ "$r" -gt "$(cat "$peak")" ] && echo "$r" > "$peak"; sleep 0.5; done ) &
        SAMPLER=$!
        slowhttptest -c "$SLOW_CONNS" -l "$SLOW_SECONDS" "${args[@]}" >"$WORK/slowhttptest-$mode-$1.log" 2>&1 &
        SLOW=$!
        sleep 2 # the slow connections are opening
        "$FLEETLB" bench --target "http://127.0.0.1:$3" --path /bench --rate 5 --duration "$((SLOW_SECONDS - 4))s" -c 4 --timeout 10s --out "$out" --max-error-rate 1 >/dev/null 2>&1 || true
        wait $SLOW 2>/dev/null || true
        kill $SAMPLER 2>/dev/null || true; wait $SAMPLER 2>/dev/null || true
        read -r failed p99 < <(python3 -c "import json; p=json.load(open('$out/summary.json'))['paths'][0]; print(p['failed'], '%.1f' % p['latency_ms']['p99'])")
        echo "| $mode | $1 | $failed | $p99 | $(python3 -c "print('%.1f' % ($(cat "$peak")/1024))") |"
      done
      stop_all
    done
    echo ;;
  grpc)
    # Unary gRPC calls (fleetlb.demo.Echo/Say, examples/grpc/echo.proto) from ONE client
    # connection to 4 identical `fleetlb backend --grpc` instances through each proxy: fleetlb
    # (spec.protocol: GRPC), nginx (grpc_pass) and HAProxy (proto h2), driven by ghz.
    GHZ=$(command -v ghz || echo "$(go env GOPATH 2>/dev/null)/bin/ghz")
    if [ ! -x "$GHZ" ] && command -v go >/dev/null; then
      echo "bench/compare.sh: building ghz from the Go module proxy" >&2
      go install github.com/bojand/ghz/cmd/ghz@v0.120.0 >&2
    fi
    [ -x "$GHZ" ] || { echo "bench/compare.sh: grpc needs ghz (go install github.com/bojand/ghz/cmd/ghz@v0.120.0)" >&2; exit 64; }
    GRPC_CONC=${GRPC_CONC:-50}
    echo "## gRPC: unary calls over one client connection, 4 instances (ghz, $GRPC_CONC concurrent calls, $((DURATION * 10000)) calls)"
    echo
    echo "| proxy | calls/s | p50 ms | p99 ms | errors | CPU us/call | calls per instance |"
    echo "|---|---|---|---|---|---|---|"
    ports=()
    for i in 1 2 3 4; do
      port=$((BASE + i))
      "$FLEETLB" backend --id "g$i" --cluster bench --port "$port" --latency-ms 1 --concurrency 100000 --grpc >/dev/null 2>&1 &
      PIDS+=($!); ports+=("$port")
    done
    for p in "${ports[@]}"; do wait_port "$p"; done
    FLEET_ROUTE=/fleetlb.demo.Echo FLEET_PROTOCOL=GRPC start_fleetlb "${ports[@]}"
    NGINX_GRPC=1 start_nginx "${ports[@]}"
    HAPROXY_H2=1 start_haproxy "${ports[@]}"
    served() { for p in "${ports[@]}"; do curl -s "127.0.0.1:$p/served" | python3 -c 'import json,sys; print(json.load(sys.stdin)["served"])'; done; }
    # A count of calls, not a duration: ghz ends a timed run by closing its connection under
    # the calls in flight, which it then reports as errors.
    ghz_run() { # port calls -> ghz JSON
      "$GHZ" --insecure --proto examples/grpc/echo.proto --call fleetlb.demo.Echo.Say -d '{"message":"hi"}' \
        --connections 1 -c "$GRPC_CONC" -n "$2" --format json "127.0.0.1:$1" 2>/dev/null
    }
    for t in "fleetlb $FLEET_PID $FLEET_PORT" "nginx $NGINX_PID $NGINX_PORT" "haproxy $HAPROXY_PID $HAPROXY_PORT"; do
      set -- $t
      ghz_run "$3" 2000 >/dev/null # warm-up
      mapfile -t before < <(served)
      c0=$(cpu_ticks "$2")
      ghz_run "$3" "$((DURATION * 10000))" > "$WORK/ghz-$1.json"
      c1=$(cpu_ticks "$2")
      mapfile -t after < <(served)
      spread=""
      for i in 0 1 2 3; do spread="$spread $((after[i] - before[i]))"; done
      python3 - "$WORK/ghz-$1.json" "$1" "$((c1 - c0))" "$(getconf CLK_TCK)" "$spread" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
name, ticks, hz, spread = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), [int(x) for x in sys.argv[5].split()]
lat = {d["percentage"]: d["latency"] / 1e6 for d in r.get("latencyDistribution") or []}
codes = r.get("statusCodeDistribution") or {}
errors = sum(v for k, v in codes.items() if k != "OK")
n = sum(codes.values()) or 1
total = sum(spread) or 1
shares = " / ".join("%d%%" % round(100 * s / total) for s in spread)
print("| %s | %.0f | %.2f | %.2f | %d | %.0f | %s |" % (name, r["rps"], lat.get(50, 0), lat.get(99, 0), errors, ticks / hz * 1e6 / n, shares))
PY
    done
    stop_all
    echo ;;
  *) echo "unknown scenario $scenario (throughput burst hetero failover memory probes tool https rules slow accesslog grpc)" >&2; exit 64 ;;
  esac
done
