#!/usr/bin/env bash
# Start N local JAX processes that form one multi-process CPU cluster (gloo collectives).
# Each process gets GENCTL_* variables that genctl_jax.parallel.distributed.initialize() reads.
set -euo pipefail

PROG=multiprocess_cpu.sh
USAGE="launch/multiprocess_cpu.sh N [--devices-per-process D] [--port P] [--log-dir DIR] [--dry-run] -- COMMAND [ARG...]"

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

show_help() {
  cat <<EOF
usage: $USAGE

Runs COMMAND N times on this machine as processes 0..N-1 of one JAX cluster and waits for all.
If one process fails, the others are stopped and the launcher exits with its status.

  N                        number of processes (>= 1)
  --devices-per-process D  fake CPU devices per process (GENCTL_LOCAL_DEVICES, default 1)
  --port P                 coordinator port on localhost (default: a free port)
  --log-dir DIR            write process i's output to DIR/process_i.log
                           (default: print it here, each line prefixed with "[i] ")
  --dry-run                print the command line of each process, one per line, and exit
  -h, --help               show this help

On a failure the other processes get SIGTERM, then SIGKILL after GENCTL_LAUNCH_GRACE_S seconds
(default 10).

Each process runs with JAX_PLATFORMS=cpu, GENCTL_COORDINATOR=localhost:P,
GENCTL_NUM_PROCESSES=N, GENCTL_PROCESS_ID=i and GENCTL_LOCAL_DEVICES=D.

example:
  launch/multiprocess_cpu.sh 2 --devices-per-process 4 -- \\
    .venv/bin/python -m genctl_jax.train --config configs/shapes_autoencoder.py --workdir runs/mp
EOF
}

free_port() {
  if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
  else
    echo $((20000 + RANDOM % 30000))
  fi
}

num="" devices=1 port="" log_dir="" dry_run=0
while (($#)); do
  case $1 in
    -h | --help) show_help; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --devices-per-process | --port | --log-dir)
      (($# >= 2)) || usage_error "$1 needs a value"
      case $1 in
        --devices-per-process) devices=$2 ;;
        --port) port=$2 ;;
        --log-dir) log_dir=$2 ;;
      esac
      shift 2 ;;
    --devices-per-process=*) devices=${1#*=}; shift ;;
    --port=*) port=${1#*=}; shift ;;
    --log-dir=*) log_dir=${1#*=}; shift ;;
    --) shift; break ;;
    -*) usage_error "unknown option '$1'" ;;
    *)
      [[ -z $num ]] || usage_error "unexpected argument '$1' (put the command after --)"
      num=$1; shift ;;
  esac
done
cmd=("$@")

[[ -n $num ]] || usage_error "missing N, the number of processes"
is_uint "$num" && ((num >= 1)) || usage_error "N must be an integer >= 1, got '$num'"
is_uint "$devices" && ((devices >= 1)) ||
  usage_error "--devices-per-process must be an integer >= 1, got '$devices'"
if [[ -n $port ]]; then
  is_uint "$port" && ((port >= 1 && port <= 65535)) ||
    usage_error "--port must be an integer in 1..65535, got '$port'"
fi
((${#cmd[@]})) || usage_error "no command given after --"
# `wait -n -p` (bash >= 5.1) lets us react to the first process that exits.
if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  echo "$PROG: error: needs bash >= 5.1, this is $BASH_VERSION" >&2
  exit 2
fi
[[ -n $port ]] || port=$(free_port)

# argv of process i, as `env VAR=... COMMAND...`; dry run prints exactly what would run.
process_argv() {
  argv=(env JAX_PLATFORMS=cpu "GENCTL_COORDINATOR=localhost:$port" "GENCTL_NUM_PROCESSES=$num"
    "GENCTL_PROCESS_ID=$1" "GENCTL_LOCAL_DEVICES=$devices" "${cmd[@]}")
}

if ((dry_run)); then
  for ((i = 0; i < num; i++)); do
    process_argv "$i"
    shell_join "${argv[@]}"
  done
  exit 0
fi

prefix_lines() {  # copy stdin to stdout, each line prefixed with "[$1] "
  trap '' INT  # on Ctrl-C keep relaying the processes' last words until they close the pipe
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    printf '[%s] %s\n' "$1" "$line"
  done
}

# Job control puts every process in its own process group: we can signal a process together
# with anything it spawned, and a Ctrl-C on the terminal reaches only this script.
set -m
pids=() relays=()
declare -A index_of=()

# SIGTERM every process group, give the processes GRACE_S seconds (e.g. to write a checkpoint),
# then SIGKILL whatever is left in their groups.
GRACE_S=${GENCTL_LAUNCH_GRACE_S:-10}
is_uint "$GRACE_S" || usage_error "GENCTL_LAUNCH_GRACE_S must be whole seconds, got '$GRACE_S'"
stop_all() {
  local pid alive
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for ((tick = 0; tick < GRACE_S * 10; tick++)); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
# Bash reports each job it has terminated ("Terminated ..."); that is noise here, hence 2>/dev/null.
trap '{ stop_all; wait; } 2>/dev/null; exit 130' INT
trap '{ stop_all; wait; } 2>/dev/null; exit 143' TERM

if [[ -n $log_dir ]]; then
  mkdir -p "$log_dir"
  echo "$PROG: $num processes, coordinator localhost:$port, logs in $log_dir/process_*.log" >&2
fi
for ((i = 0; i < num; i++)); do
  process_argv "$i"
  if [[ -n $log_dir ]]; then
    "${argv[@]}" >"$log_dir/process_$i.log" 2>&1 </dev/null &
  else
    # The process itself is the job (so its pid is its process group); a relay prefixes its lines.
    exec {relay_fd}> >(prefix_lines "$i")
    relays+=("$!")
    "${argv[@]}" >&"$relay_fd" 2>&1 </dev/null &
    exec {relay_fd}>&-
  fi
  pids+=("$!")
  index_of[$!]=$i
done

running=("${pids[@]}")
while ((${#running[@]})); do
  status=0 finished=""
  wait -n -p finished "${running[@]}" || status=$?
  [[ -n $finished ]] || { echo "$PROG: error: lost track of the processes" >&2; stop_all; exit 1; }
  still=()
  for pid in "${running[@]}"; do [[ $pid == "$finished" ]] || still+=("$pid"); done
  running=("${still[@]}")
  if ((status != 0)); then
    trap - INT TERM
    { stop_all; wait "${pids[@]}"; } 2>/dev/null || true
    ((${#relays[@]} == 0)) || wait "${relays[@]}" 2>/dev/null || true
    echo "$PROG: process ${index_of[$finished]} exited with status $status;" \
      "stopped the other processes" >&2
    exit "$status"
  fi
done
# Let the relays print the last lines before we return.
((${#relays[@]} == 0)) || wait "${relays[@]}" 2>/dev/null || true
