# ops/lib/redis-cluster.sh: the stack's Redis Cluster (3 masters + 3 replicas on 127.0.0.1).
# Sourced by ops/stack, which calls cluster_up / cluster_down / cluster_status / cluster_url
# and uses its helpers (say, warn, die, wait_for, port_open, pid_alive, pid_dead,
# read_pid_file, render, check_port, $STATE_DIR, $OPS_DIR).
#
#   ops/stack up --redis-cluster   (or SCALEPUB_REDIS_CLUSTER=on) starts the cluster besides
#                                  the single Redis (kept as the benchmarks' baseline) and
#                                  ejabberd; the choice is recorded in the state dir, so
#                                  later down/status/env/up see it without the flag.
#   SCALEPUB_REDIS_CLUSTER_PORT    first node's port (7000); the nodes use 6 consecutive ports
#                                  from it, their cluster bus ports are each port + 10000.
#
# `ops/stack env` then prints SCALEPUB_REDIS_URL=redis+cluster://127.0.0.1:<first port>/:
# the scheme redis+cluster marks a cluster (scalepub/connections.py); the host is one node,
# the client learns the others from it.

CLUSTER_NODES=6
CLUSTER_BUS_OFFSET=10000
# Slot ranges of the three masters. Not `redis-cli --cluster create`'s even thirds
# (0-5460, 5461-10922, 10923-16383): with those, the hash tags {0}..{7} of 8 shards land
# 2/4/2 on the masters; with these bounds 3/3/2, as even as 8 over 3 can be (tests check it).
CLUSTER_SLOT_RANGES=("0 5700" "5701 11000" "11001 16383")

cluster_dir() { printf '%s' "$STATE_DIR/redis-cluster"; }

# Whether this stack runs a cluster: asked for now, or recorded by an earlier `up`.
cluster_enabled() {
  [[ ${SCALEPUB_REDIS_CLUSTER:-} == on || -r $(cluster_dir)/settings ]]
}

cluster_load_settings() {
  local recorded=""
  if [[ -r $(cluster_dir)/settings ]]; then
    recorded=$(sed -n 's/^SCALEPUB_REDIS_CLUSTER_PORT=//p' "$(cluster_dir)/settings")
  fi
  CLUSTER_PORT=${SCALEPUB_REDIS_CLUSTER_PORT:-${recorded:-7000}}
  case ${SCALEPUB_REDIS_CLUSTER:-} in
    "" | on | off) ;;
    *) die "SCALEPUB_REDIS_CLUSTER must be on or off (got '$SCALEPUB_REDIS_CLUSTER')" ;;
  esac
  check_port SCALEPUB_REDIS_CLUSTER_PORT "$CLUSTER_PORT"
  ((CLUSTER_PORT + CLUSTER_NODES - 1 + CLUSTER_BUS_OFFSET <= 65535)) ||
    die "SCALEPUB_REDIS_CLUSTER_PORT=$CLUSTER_PORT: its nodes' bus ports (port + $CLUSTER_BUS_OFFSET) pass 65535"
  local p
  for p in $(cluster_ports); do
    [[ $p != "$REDIS_PORT" && $p != "$XMPP_PORT" && $p != "$HTTP_PORT" ]] ||
      die "SCALEPUB_REDIS_CLUSTER_PORT=$CLUSTER_PORT: node port $p collides with another port of the stack"
  done
}

cluster_ports() { seq "$CLUSTER_PORT" $((CLUSTER_PORT + CLUSTER_NODES - 1)); }

cluster_cli() { redis-cli -h 127.0.0.1 -p "$1" "${@:2}"; }

cluster_node_pid() {
  local pid comm=""
  pid=$(read_pid_file "$(cluster_dir)/$1/redis.pid")
  [[ -n $pid ]] || return 0
  { read -r comm <"/proc/$pid/comm"; } 2>/dev/null || true
  [[ $comm == redis-server ]] && printf '%s' "$pid"
  return 0
}

cluster_start_node() {
  local port=$1 dir
  dir=$(cluster_dir)/$port
  if [[ -n $(cluster_node_pid "$port") ]]; then
    return 0
  fi
  ! port_open "$port" || die "redis cluster: port $port on 127.0.0.1 is already in use"
  ! port_open $((port + CLUSTER_BUS_OFFSET)) ||
    die "redis cluster: bus port $((port + CLUSTER_BUS_OFFSET)) on 127.0.0.1 is already in use"
  mkdir -p -- "$dir"
  render "$OPS_DIR/redis/redis-cluster.conf" "$dir/redis.conf" \
    "PORT=$port" "BUS_PORT=$((port + CLUSTER_BUS_OFFSET))" "NODE_DIR=$dir"
  redis-server "$dir/redis.conf" || die "redis cluster: node $port failed to start (see $dir/redis.log)"
  redis_ping "$port" || wait_for 20 redis_ping "$port" ||
    die "redis cluster: node $port not answering (see $dir/redis.log)"
}

cluster_state_ok() { cluster_cli "$1" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; }

cluster_known_nodes() {
  cluster_cli "$1" cluster info 2>/dev/null | sed -n 's/^cluster_known_nodes:\([0-9]*\).*/\1/p'
}

cluster_all_ok() {
  local p
  for p in $(cluster_ports); do
    cluster_state_ok "$p" || return 1
    [[ $(cluster_known_nodes "$p") == "$CLUSTER_NODES" ]] || return 1
  done
}

# Masters get CLUSTER_SLOT_RANGES, all nodes meet, each replica follows its master.
cluster_create() {
  local ports first i master id
  mapfile -t ports < <(cluster_ports)
  first=${ports[0]}
  for i in 0 1 2; do
    # shellcheck disable=SC2086
    cluster_cli "${ports[i]}" cluster addslotsrange ${CLUSTER_SLOT_RANGES[i]} >/dev/null ||
      die "redis cluster: could not assign slots to node ${ports[i]}"
  done
  for i in "${!ports[@]}"; do
    ((i == 0)) || cluster_cli "$first" cluster meet 127.0.0.1 "${ports[i]}" \
      $((ports[i] + CLUSTER_BUS_OFFSET)) >/dev/null
  done
  wait_for 30 cluster_all_know || die "redis cluster: nodes did not meet within 30 s"
  for i in 3 4 5; do
    master=${ports[i - 3]}
    id=$(cluster_cli "$master" cluster myid)
    wait_for 20 cluster_replicate "${ports[i]}" "$id" ||
      die "redis cluster: node ${ports[i]} could not become a replica of $master"
  done
}

cluster_all_know() {
  local p
  for p in $(cluster_ports); do
    [[ $(cluster_known_nodes "$p") == "$CLUSTER_NODES" ]] || return 1
  done
}

cluster_replicate() { [[ $(cluster_cli "$1" cluster replicate "$2" 2>&1) == OK ]]; }

cluster_up() {
  cluster_enabled || return 0
  mkdir -p -- "$(cluster_dir)"
  printf 'SCALEPUB_REDIS_CLUSTER_PORT=%s\n' "$CLUSTER_PORT" >"$(cluster_dir)/settings"
  local p fresh=1
  for p in $(cluster_ports); do
    [[ -s $(cluster_dir)/$p/nodes.conf ]] && fresh=""
    cluster_start_node "$p"
  done
  [[ -z $fresh ]] || cluster_create
  if ! wait_for 60 cluster_all_ok; then
    cluster_cli "$CLUSTER_PORT" cluster nodes >&2 || true
    die "redis cluster: not ok within 60 s (nodes above)"
  fi
  say "redis cluster: running (3 masters + 3 replicas, 127.0.0.1:$CLUSTER_PORT-$((CLUSTER_PORT + CLUSTER_NODES - 1)))"
}

# SIGTERM = SHUTDOWN: each node fsyncs its AOF and saves nodes.conf.
cluster_down() {
  cluster_enabled || return 0
  local p pid stopped=""
  for p in $(cluster_ports); do
    pid=$(cluster_node_pid "$p")
    [[ -n $pid ]] || continue
    kill -TERM "$pid"
    wait_for 60 pid_dead "$pid" || die "redis cluster: node $p (pid $pid) did not exit within 60 s"
    stopped+=" $p"
  done
  if [[ -n $stopped ]]; then
    say "redis cluster: stopped (nodes$stopped)"
  else
    say "redis cluster: not running"
  fi
}

# One line per node (port, pid, role, slots) and the cluster state; 1 if a node is down
# or the cluster is not ok.
cluster_status() {
  cluster_enabled || return 0
  local p pid rc=0 line
  for p in $(cluster_ports); do
    pid=$(cluster_node_pid "$p")
    if [[ -z $pid ]] || ! redis_ping "$p"; then
      say "redis cluster: node 127.0.0.1:$p not running"
      rc=1
      continue
    fi
    line=$(cluster_cli "$p" cluster nodes 2>/dev/null | awk '
      { split($2, a, "@"); addr[$1] = a[1] }
      $3 ~ /myself/ { me = $0 }
      END {
        n = split(me, f, " "); slots = ""
        for (i = 9; i <= n; i++) slots = slots " " f[i]
        if (f[3] ~ /master/) print "master" (slots == "" ? "" : ", slots" slots)
        else print "replica of " addr[f[4]] }')
    say "redis cluster: node 127.0.0.1:$p (pid $pid): ${line:-unknown}"
  done
  local state
  state=$(cluster_cli "$CLUSTER_PORT" cluster info 2>/dev/null | sed -n 's/^cluster_state:\(.*\)\r\?$/\1/p' | tr -d '\r')
  say "redis cluster: state ${state:-unknown}"
  [[ $state == ok ]] || rc=1
  return "$rc"
}

# The SCALEPUB_REDIS_URL `env` prints: the cluster's when this stack runs one, else the
# single Redis's.
cluster_url() {
  if cluster_enabled; then
    printf 'redis+cluster://127.0.0.1:%s/' "$CLUSTER_PORT"
  else
    printf 'redis://127.0.0.1:%s/0' "$REDIS_PORT"
  fi
}
