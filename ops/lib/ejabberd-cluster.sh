# shellcheck shell=bash
# ops/lib/ejabberd-cluster.sh: more ejabberd nodes, clustered with the stack's first one.
# Sourced by ops/stack; uses its helpers and variables (NODE, XMPP_PORT, EJ_DIR, ...).
#
#   ops/stack up --ejabberd-nodes 2      (or SCALEPUB_EJABBERD_NODES=2 ops/stack up)
#
# Node k (2..N) is node 1's name with k appended to its name part (scalepub@localhost ->
# scalepub2@localhost), so node names stay unique per stack as long as node 1's is: every
# stack of the machine registers its nodes with the one shared epmd. Node k has its own
# dir $STATE_DIR/ejabberd<k> (config, spool, logs) and its own loopback ports
# SCALEPUB_XMPP_PORT_<k> / SCALEPUB_HTTP_PORT_<k> (default: node 1's port + k - 1). All
# nodes of a stack share one Erlang cookie, kept in $STATE_DIR/erlang.cookie and given to
# each node by a vm.args in its config dir (so also to ejabberdctl): a stack never joins, or
# is reachable from, another stack's nodes. The cookie shows in the process list, which is
# fine for a loopback stack; a real deployment puts it in ~ejabberd/.erlang.cookie.
# Node k joins with `ejabberdctl join_cluster` on its first start (Mnesia then copies
# node 1's tables, accounts included); `down` stops nodes N..2 before node 1 so that node 1,
# stopped last, can start first next time (Mnesia waits for the node that stopped last).

MAX_EJABBERD_NODES=9
EJC_FILE_NAME=ejabberd-cluster

# Node count and the extra nodes' ports: environment, then what `up` recorded, then defaults.
ejc_load_settings() {
  EJC_FILE=$STATE_DIR/$EJC_FILE_NAME
  local line key
  if [[ -r $EJC_FILE ]]; then
    while IFS= read -r line; do
      key=${line%%=*}
      [[ $key =~ ^SCALEPUB_(EJABBERD_NODES|XMPP_PORT_[0-9]|HTTP_PORT_[0-9])$ ]] || continue
      [[ -n ${!key:-} ]] || printf -v "$key" '%s' "${line#*=}"
    done <"$EJC_FILE"
  fi
  EJ_NODES=${SCALEPUB_EJABBERD_NODES:-1}
  [[ $EJ_NODES =~ ^[1-9]$ ]] && ((EJ_NODES <= MAX_EJABBERD_NODES)) ||
    die "SCALEPUB_EJABBERD_NODES (--ejabberd-nodes) must be 1 to $MAX_EJABBERD_NODES, got '$EJ_NODES'"
  local k port used="$REDIS_PORT $XMPP_PORT $HTTP_PORT" var
  for ((k = 2; k <= EJ_NODES; k++)); do
    for var in XMPP_PORT HTTP_PORT; do
      port=SCALEPUB_${var}_$k
      printf -v "$port" '%s' "${!port:-$((${!var} + k - 1))}"
      check_port "$port" "${!port}"
      [[ " $used " != *" ${!port} "* ]] || die "$port=${!port}: port already used by this stack ($used)"
      used+=" ${!port}"
    done
  done
}

ejc_save_settings() {
  local k
  {
    say "SCALEPUB_EJABBERD_NODES=$EJ_NODES"
    for ((k = 2; k <= EJ_NODES; k++)); do
      say "SCALEPUB_XMPP_PORT_$k=$(ejc_port XMPP "$k")"
      say "SCALEPUB_HTTP_PORT_$k=$(ejc_port HTTP "$k")"
    done
  } >"$EJC_FILE.tmp"
  mv -f -- "$EJC_FILE.tmp" "$EJC_FILE"
}

# ejc_port XMPP|HTTP K: node K's c2s or http port.
ejc_port() {
  if (($2 == 1)); then
    local var=$1_PORT
  else
    local var=SCALEPUB_$1_PORT_$2
  fi
  printf '%s' "${!var}"
}

ejc_node_name() {
  if (($1 == 1)); then printf '%s' "$NODE"; else printf '%s' "${NODE%%@*}$1@${NODE#*@}"; fi
}

# on_ejabberd_node K CMD...: run CMD with ops/stack's ejabberd variables pointing at node K
# (bash's dynamic scope: the functions CMD calls see these locals).
on_ejabberd_node() {
  local k=$1 node xmpp http dir
  node=$(ejc_node_name "$k")
  xmpp=$(ejc_port XMPP "$k")
  http=$(ejc_port HTTP "$k")
  dir=$STATE_DIR/ejabberd$k
  ((k > 1)) || dir=$STATE_DIR/ejabberd
  local NODE=$node XMPP_PORT=$xmpp HTTP_PORT=$http RECORDED_NODE="" EJ_DIR=$dir
  local EJ_ETC=$dir/etc EJ_SPOOL=$dir/spool EJ_LOGS=$dir/log EJ_PID_FILE=$dir/ejabberd.pid
  local EJ_CTL_CFG=$dir/etc/ejabberdctl.cfg EJ_YML=$dir/etc/ejabberd.yml
  "${@:2}"
}

# The stack's Erlang cookie (made once), handed to the node of the current EJ_ETC.
ejc_write_cookie() {
  local cookie=$STATE_DIR/erlang.cookie
  if [[ ! -s $cookie ]]; then
    (umask 077 && head -c 30 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32 >"$cookie.tmp")
    mv -f -- "$cookie.tmp" "$cookie"
  fi
  mkdir -p -- "$EJ_ETC" "$EJ_SPOOL" "$EJ_LOGS"
  (umask 077 && printf -- '-setcookie %s\n' "$(<"$cookie")" >"$EJ_ETC/vm.args")
  ! is_root || chown -R "$EJ_USER:$EJ_USER" -- "$EJ_DIR"
}

# Before node 1 starts (`up`): record the settings; in a cluster, node 1 takes the cookie.
ejabberd_cluster_prepare() {
  ejc_save_settings
  ((EJ_NODES > 1)) || return 0
  if [[ ! -e $EJ_ETC/vm.args && -n $(ejabberd_pid) ]]; then
    die "ejabberd: node $NODE runs without this stack's cluster cookie: ops/stack down, then up --ejabberd-nodes $EJ_NODES"
  fi
  ejc_write_cookie
}

ejc_members() { ejctl 30 list_cluster 2>/dev/null || true; }

# Start node K (after node 1) and join it to node 1's cluster unless it is a member.
ejc_start_node() {
  local first=$1
  ejc_write_cookie
  start_ejabberd
  [[ $(ejc_members) != *"$first"* ]] || return 0
  local out
  out=$(ejctl 120 join_cluster "$first" 2>&1) || die "ejabberd: $NODE could not join $first: $out"
  wait_ejabberd_started || die "ejabberd: $NODE does not answer after joining $first"
  [[ $(ejc_members) == *"$first"* ]] || die "ejabberd: $NODE joined but $first is not in its cluster"
  say "ejabberd: $NODE joined the cluster of $first"
}

ejabberd_cluster_up() {
  local k
  for ((k = 2; k <= EJ_NODES; k++)); do
    on_ejabberd_node "$k" ejc_start_node "$NODE"
  done
}

# Every extra node this stack dir ever had, highest first, whatever the node count now.
ejc_dirs_desc() {
  local d
  for d in "$STATE_DIR"/ejabberd[2-9]; do
    [[ -d $d ]] && printf '%s\n' "${d##*/ejabberd}"
  done | sort -rn
}

ejabberd_cluster_down() {
  local k
  for k in $(ejc_dirs_desc); do
    on_ejabberd_node "$k" ejc_stop_node
  done
}

# Like stop_ejabberd, without stopping epmd (node 1, stopped next, still uses it).
ejc_stop_node() {
  local pid
  pid=$(ejabberd_pid)
  if [[ -z $pid ]]; then
    say "ejabberd: not running (node $NODE)"
    return 0
  fi
  ejctl 60 stop >/dev/null 2>&1 || true
  wait_for 60 pid_dead "$pid" || kill_node
  [[ -z $(node_pids) ]] || die "ejabberd: node $NODE still has processes: $(node_pids | xargs)"
  say "ejabberd: stopped (pid $pid, node $NODE)"
}

# Status lines for nodes 2..N; returns 3 if one does not run.
ejabberd_cluster_status() {
  local k rc=0
  for ((k = 2; k <= EJ_NODES; k++)); do
    on_ejabberd_node "$k" ejc_node_status || rc=3
  done
  return "$rc"
}

ejc_node_status() {
  local pid
  pid=$(ejabberd_pid)
  if [[ -n $pid ]] && port_open "$XMPP_PORT"; then
    say "ejabberd: running (pid $pid, node $NODE, c2s 127.0.0.1:$XMPP_PORT, http 127.0.0.1:$HTTP_PORT)"
  else
    say "ejabberd: not running${pid:+ (pid $pid, c2s port $XMPP_PORT closed)} (node $NODE)"
    return 3
  fi
}

# `env` for a cluster: node K's ports as SCALEPUB_XMPP_PORT_K, SCALEPUB_BOSH_URL_K,
# SCALEPUB_WS_URL_K. A supervisor or subscriber uses node K by taking them as its
# SCALEPUB_XMPP_PORT / BOSH / WS values (same host, domain, account and password).
ejabberd_cluster_env() {
  ((EJ_NODES > 1)) || return 0
  export_line SCALEPUB_EJABBERD_NODES "$EJ_NODES"
  local k xmpp http
  for ((k = 2; k <= EJ_NODES; k++)); do
    xmpp=$(ejc_port XMPP "$k")
    http=$(ejc_port HTTP "$k")
    say "# ejabberd node $k ($(ejc_node_name "$k")): point a supervisor or subscriber at it with"
    say "#   SCALEPUB_XMPP_PORT=\$SCALEPUB_XMPP_PORT_$k (BOSH/WS: SCALEPUB_BOSH_URL_$k, SCALEPUB_WS_URL_$k)"
    export_line "SCALEPUB_XMPP_PORT_$k" "$xmpp"
    export_line "SCALEPUB_BOSH_URL_$k" "http://127.0.0.1:$http/bosh"
    export_line "SCALEPUB_WS_URL_$k" "ws://127.0.0.1:$http/ws"
  done
}
