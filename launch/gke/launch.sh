#!/usr/bin/env bash
# Render jobset.yaml.tmpl for one multi-host TPU slice and submit it with kubectl.
set -euo pipefail

PROG=launch.sh
USAGE="launch/gke/launch.sh --image IMG --tpu-type TYPE --topology TOPO --num-hosts N [--name NAME] [--max-restarts K] [--dry-run] -- COMMAND [ARG...]"
TEMPLATE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/jobset.yaml.tmpl"

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

show_help() {
  cat <<EOF
usage: $USAGE

Renders $TEMPLATE into a JobSet with one pod per TPU host, each running
  bash -c 'COMMAND ARG...'
in the image's working directory with GENCTL_AUTO_DISTRIBUTED=1 (JAX finds the other hosts
from the variables GKE sets), and pipes it to 'kubectl apply -f -' (current kubectl context).

  --image IMG         container image holding this repository and its environment
  --tpu-type TYPE     v5litepod-N (alias v5e-N), v6e-N (N chips) or v4-N, v5p-N (N TensorCores), e.g. v5litepod-16
  --topology TOPO     slice topology, e.g. 4x4 (v5litepod, v6e) or 2x2x4 (v4, v5p)
  --num-hosts N       TPU VMs in the slice (one pod each), e.g. 4 for v5litepod-16
  --name NAME         JobSet name (default: genctl-YYYYMMDD-HHMMSS)
  --max-restarts K    times JobSet restarts the whole slice after a failure (default 0)
  --dry-run           print the kubectl command with the rendered manifest (as a here-document)
  -h, --help          show this help

example:
  launch/gke/launch.sh --image us-docker.pkg.dev/proj/repo/genctl:latest \\
    --tpu-type v5litepod-16 --topology 4x4 --num-hosts 4 -- \\
    python -m genctl_jax.train --config configs/shapes_autoencoder.py --workdir /mnt/shared/run1
EOF
}

# A YAML double-quoted scalar holding $1 exactly.
yaml_quote() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\t'/\\t}
  printf '"%s"' "$s"
}

image="" tpu_type="" topology="" num_hosts="" name="" max_restarts=0 dry_run=0
while (($#)); do
  case $1 in
    -h | --help) show_help; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --image | --tpu-type | --topology | --num-hosts | --name | --max-restarts)
      (($# >= 2)) || usage_error "$1 needs a value"
      case $1 in
        --image) image=$2 ;;
        --tpu-type) tpu_type=$2 ;;
        --topology) topology=$2 ;;
        --num-hosts) num_hosts=$2 ;;
        --name) name=$2 ;;
        --max-restarts) max_restarts=$2 ;;
      esac
      shift 2 ;;
    --image=*) image=${1#*=}; shift ;;
    --tpu-type=*) tpu_type=${1#*=}; shift ;;
    --topology=*) topology=${1#*=}; shift ;;
    --num-hosts=*) num_hosts=${1#*=}; shift ;;
    --name=*) name=${1#*=}; shift ;;
    --max-restarts=*) max_restarts=${1#*=}; shift ;;
    --) shift; break ;;
    -*) usage_error "unknown option '$1'" ;;
    *) usage_error "unexpected argument '$1' (put the command after --)" ;;
  esac
done
cmd=("$@")

[[ -n $image ]] || usage_error "missing --image IMG"
[[ -n $tpu_type ]] || usage_error "missing --tpu-type TYPE"
[[ -n $topology ]] || usage_error "missing --topology TOPO"
[[ -n $num_hosts ]] || usage_error "missing --num-hosts N"
((${#cmd[@]})) || usage_error "no command given after --"

# Plain-scalar values go into the YAML unquoted, so allow only characters that are safe there.
[[ $image =~ ^[A-Za-z0-9][A-Za-z0-9._/:@-]*$ ]] || usage_error "--image '$image' is not an image reference"
[[ -n $name ]] || name="genctl-$(date +%Y%m%d-%H%M%S)"
# Pod names append about 20 characters to the JobSet name and must stay within 63.
[[ $name =~ ^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$ ]] ||
  usage_error "--name '$name' must be lowercase letters, digits and '-', start with a letter, at most 40 long"
is_uint "$max_restarts" || usage_error "--max-restarts must be an integer >= 0, got '$max_restarts'"
is_uint "$num_hosts" && ((num_hosts >= 1)) || usage_error "--num-hosts must be an integer >= 1, got '$num_hosts'"

[[ $tpu_type =~ ^(v4|v5p|v5litepod|v5e|v6e)-([0-9]+)$ ]] ||
  usage_error "--tpu-type '$tpu_type' is not one of v4-N, v5p-N, v5litepod-N (or v5e-N), v6e-N"
generation=${BASH_REMATCH[1]} size=$((10#${BASH_REMATCH[2]}))
case $generation in
  v4) accelerator=tpu-v4-podslice dims=3 chips=$((size / 2)) ;;
  v5p) accelerator=tpu-v5p-slice dims=3 chips=$((size / 2)) ;;
  v5litepod | v5e) accelerator=tpu-v5-lite-podslice dims=2 chips=$size ;;
  v6e) accelerator=tpu-v6e-slice dims=2 chips=$size ;;
esac
[[ $topology =~ ^[1-9][0-9]*(x[1-9][0-9]*)+$ ]] || usage_error "--topology '$topology' is not like 4x4 or 2x2x4"
IFS=x read -ra sides <<<"$topology"
((${#sides[@]} == dims)) || usage_error "--topology '$topology' for $generation needs $dims dimensions"
topo_chips=1
for side in "${sides[@]}"; do topo_chips=$((topo_chips * side)); done
((topo_chips == chips)) ||
  usage_error "--topology $topology has $topo_chips chips but --tpu-type $tpu_type has $chips"
((chips % num_hosts == 0)) ||
  usage_error "--num-hosts $num_hosts does not divide the $chips chips of $tpu_type"
chips_per_host=$((chips / num_hosts))
case $chips_per_host in
  1 | 4 | 8) ;;
  *) usage_error "--num-hosts $num_hosts gives $chips_per_host chips per host; TPU VMs have 1, 4 or 8" ;;
esac

command_line=$(shell_join "${cmd[@]}")
stripped=${command_line//[$'\n\t']/}
[[ ! $stripped =~ [[:cntrl:]] ]] ||
  usage_error "the command contains control characters other than newline and tab"

manifest=$(<"$TEMPLATE")
# Quoted replacements: with bash 5.2's patsub_replacement an unquoted '&' would be special.
manifest=${manifest//"{{NAME}}"/"$name"}
manifest=${manifest//"{{IMAGE}}"/"$image"}
manifest=${manifest//"{{ACCELERATOR}}"/"$accelerator"}
manifest=${manifest//"{{TOPOLOGY}}"/"$topology"}
manifest=${manifest//"{{NUM_HOSTS}}"/"$num_hosts"}
manifest=${manifest//"{{CHIPS_PER_HOST}}"/"$chips_per_host"}
manifest=${manifest//"{{MAX_RESTARTS}}"/"$max_restarts"}
if [[ ${manifest//"{{COMMAND}}"/} == *"{{"* ]]; then
  echo "$PROG: error: $TEMPLATE has a placeholder this script does not fill" >&2
  exit 1
fi
manifest=${manifest//"{{COMMAND}}"/"$(yaml_quote "$command_line")"}

if ((dry_run)); then
  printf "kubectl apply -f - <<'GENCTL_MANIFEST'\n%s\nGENCTL_MANIFEST\n" "$manifest"
else
  printf '%s\n' "$manifest" | kubectl apply -f -
fi
