# shellcheck shell=bash
# tests/lib.sh: what the tests/*.sh suites share: counting cases and
# checking console logs.  Sourced; a case sets `why` (empty = pass).

passed=0
failed=0

# require_output LOG TEXT...: adds to $why every TEXT that LOG lacks.
require_output() {
	local log=$1 text
	shift
	for text in "$@"; do
		grep -qF -- "$text" "$log" || why="${why:+$why; }output lacks '$text'"
	done
}

# record NAME [DETAIL]: PASS if $why is empty, else FAIL with $why.
record() {
	if [ -z "$why" ]; then
		echo "PASS $1${2:+: $2}"
		passed=$((passed + 1))
	else
		echo "FAIL $1: $why"
		failed=$((failed + 1))
	fi
}

# summary SUITE: "SUITE: P passed, F failed"; fails if a case failed.
summary() {
	echo "$1: $passed passed, $failed failed"
	[ "$failed" -eq 0 ]
}
