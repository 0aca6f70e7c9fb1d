#!/usr/bin/env bash
# Shared by the launch scripts (sourced, not run): one-line errors, and shell quoting for the commands they
# print and run.

die() {
  echo "error: $*" >&2
  exit 2
}

# mapfile -d needs bash >= 4.4 (macOS ships 3.2).
if (( BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4) )); then
  die "bash >= 4.4 is required (this is ${BASH_VERSION}; on macOS: brew install bash)"
fi

# A word quoted for a POSIX shell, and only when it must be, so printed commands stay readable and
# paste back as they are. Double quotes where that avoids escapes (gin strings carry single quotes).
quote_word() {
  local word=$1
  if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
    printf '%s' "$word"
  elif [[ "$word" != *\'* ]]; then
    printf "'%s'" "$word"
  elif [[ "$word" != *[\"\$\`\\!]* ]]; then
    printf '"%s"' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# Like quote_word, but `--flag=value` keeps the flag bare: `--command='...'`, `--gin.X="'a b'"`.
quote_arg() {
  local word=$1
  if [[ ! "$word" =~ ^[A-Za-z0-9_./:=,+@%-]*$ && "$word" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote_word "${BASH_REMATCH[2]}"
  else
    quote_word "$word"
  fi
}

# All arguments as one command line.
join_args() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote_arg "$word")"
  done
  printf '%s' "$out"
}
