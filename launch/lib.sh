# Helpers shared by the launch scripts; source it after setting PROG and USAGE.

usage_error() {  # one line on stderr, exit 2
  echo "$PROG: error: $1; usage: $USAGE" >&2
  exit 2
}

# Print arguments as one line that a POSIX shell parses back into the same words.
shell_join() {
  local out=() word q="'\\''"
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/"$q"}'")
    fi
  done
  local IFS=' '
  printf '%s\n' "${out[*]}"
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
