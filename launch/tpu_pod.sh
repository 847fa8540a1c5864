#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM slice (one JAX process per worker).
# JAX finds the slice's other workers itself; GENCTL_AUTO_DISTRIBUTED=1 tells
# genctl_jax.parallel.distributed.initialize() to let it.
set -euo pipefail

PROG=tpu_pod.sh
USAGE="launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--repo-dir DIR] [--setup [--repo-url URL] [--ref REF]] [--dry-run] -- COMMAND [ARG...]"

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

show_help() {
  cat <<EOF
usage: $USAGE

Runs COMMAND on all workers of the TPU VM slice NAME through
  gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command "..."
in DIR on each worker, with GENCTL_AUTO_DISTRIBUTED=1 and DIR/.venv/bin first on PATH.

  --tpu NAME      TPU VM (slice) name
  --zone ZONE     its zone, e.g. us-central2-b
  --project P     Google Cloud project (default: gcloud's configured project)
  --repo-dir DIR  checkout of this repository on every worker, relative to the
                  home directory unless absolute (default: genctl_jax)
  --setup         first bring DIR to the same commit on every worker: git clone URL
                  if DIR is missing, git fetch REF and check it out (detached), then
                  'make .venv/.installed' and install jax[tpu] at the venv's jax version
  --repo-url URL  repository to clone (default: this checkout's 'origin' remote)
  --ref REF       commit, branch or tag to check out (default: this checkout's HEAD commit,
                  which must be pushed)
  --dry-run       print the gcloud command lines, one per line, and exit
  -h, --help      show this help

With --setup the command may be left out (set up only).

example:
  launch/tpu_pod.sh --tpu my-v4-32 --zone us-central2-b --setup -- \\
    python -m genctl_jax.train --config configs/shapes_autoencoder.py --workdir /mnt/shared/run1
EOF
}

tpu="" zone="" project="" repo_dir=genctl_jax setup=0 repo_url="" ref="" dry_run=0
while (($#)); do
  case $1 in
    -h | --help) show_help; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --setup) setup=1; shift ;;
    --tpu | --zone | --project | --repo-dir | --repo-url | --ref)
      (($# >= 2)) || usage_error "$1 needs a value"
      case $1 in
        --tpu) tpu=$2 ;;
        --zone) zone=$2 ;;
        --project) project=$2 ;;
        --repo-dir) repo_dir=$2 ;;
        --repo-url) repo_url=$2 ;;
        --ref) ref=$2 ;;
      esac
      shift 2 ;;
    --tpu=*) tpu=${1#*=}; shift ;;
    --zone=*) zone=${1#*=}; shift ;;
    --project=*) project=${1#*=}; shift ;;
    --repo-dir=*) repo_dir=${1#*=}; shift ;;
    --repo-url=*) repo_url=${1#*=}; shift ;;
    --ref=*) ref=${1#*=}; shift ;;
    --) shift; break ;;
    -*) usage_error "unknown option '$1'" ;;
    *) usage_error "unexpected argument '$1' (put the command after --)" ;;
  esac
done
cmd=("$@")

[[ -n $tpu ]] || usage_error "missing --tpu NAME"
[[ -n $zone ]] || usage_error "missing --zone ZONE"
[[ -n $repo_dir ]] || usage_error "--repo-dir must not be empty"
((${#cmd[@]} || setup)) || usage_error "no command given after --"
if ((!setup)) && [[ -n $repo_url || -n $ref ]]; then
  usage_error "--repo-url and --ref only apply with --setup"
fi
if ((setup)); then
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if [[ -z $repo_url ]]; then
    repo_url=$(git -C "$here" remote get-url origin 2>/dev/null) ||
      usage_error "--setup needs --repo-url (this checkout has no 'origin' remote)"
  fi
  if [[ -z $ref ]]; then
    ref=$(git -C "$here" rev-parse HEAD 2>/dev/null) ||
      usage_error "--setup needs --ref (cannot read this checkout's HEAD)"
    if [[ -n $(git -C "$here" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
      echo "$PROG: warning: uncommitted changes here do not reach the workers" >&2
    fi
  fi
fi

gcloud_ssh=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone")
[[ -z $project ]] || gcloud_ssh+=(--project "$project")
gcloud_ssh+=(--worker=all --command)

dir_q=$(shell_join "$repo_dir")
commands=()
if ((setup)); then
  # Runs on each worker; jax[tpu] at the venv's own jax version brings the matching libtpu.
  remote_setup="set -e; [ -d $dir_q/.git ] || git clone --quiet $(shell_join "$repo_url") $dir_q"
  remote_setup+="; cd $dir_q; git fetch --quiet origin $(shell_join "$ref")"
  remote_setup+="; git checkout --quiet --detach FETCH_HEAD; make .venv/.installed"
  remote_setup+="; .venv/bin/python -m pip install --quiet"
  remote_setup+=" \"jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')\""
  commands+=("$(shell_join "${gcloud_ssh[@]}" "$remote_setup")")
fi
if ((${#cmd[@]})); then
  remote_run="cd $dir_q && export GENCTL_AUTO_DISTRIBUTED=1 PATH=\"\$PWD/.venv/bin:\$PATH\""
  remote_run+=" && $(shell_join "${cmd[@]}")"
  commands+=("$(shell_join "${gcloud_ssh[@]}" "$remote_run")")
fi

for line in "${commands[@]}"; do
  if ((dry_run)); then
    printf '%s\n' "$line"
  else
    # Each line was built by shell_join from the argv above, so eval gives back exactly that argv.
    eval "$line"
  fi
done
