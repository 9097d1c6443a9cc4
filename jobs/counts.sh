# Sourced by jobs/common.sh, and by jobs/local/demo.sh before it sets anything up: the checks
# of a count given to a job script, which need nothing installed.

# Whether $1 is a positive whole number: a count like "abc" or 0 made mpiexec quietly run one rank.
is_count() {
    [[ "$1" =~ ^[1-9][0-9]*$ ]]
}

# The positive whole number in environment variable $1 (default $2), or exit 2 naming it.
positive_count() {
    local value="${!1:-$2}"
    if ! is_count "$value"; then
        echo "$1=$value: give a positive whole number" >&2
        exit 2
    fi
    echo "$value"
}
