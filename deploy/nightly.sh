#!/usr/bin/env bash
# popcast nightly from cron: featurize, then score, the previous UTC day, whatever the machine's time zone.
#
# Debian's cron has no CRON_TZ: the times in a crontab are the machine's local time, and its zone may be
# anything (and may change with daylight saving time). So deploy/crontab starts this script every quarter
# hour, and the script acts only when the UTC time is in the quarter hour from POPCAST_RUN_AT_UTC (02:30,
# when the day's catalog export has landed). Every zone's UTC offset is a whole number of quarter hours, so
# exactly one start a day falls in that quarter hour; the day is yesterday in UTC (`date -u`).
#
#   deploy/nightly.sh              at 02:30-02:44 UTC: featurize + score yesterday (UTC); otherwise exit 0
#   deploy/nightly.sh 2026-11-28   now, for that day (a rerun or a backfill)
#
# Settings, from the environment (deploy/crontab sets them at its top):
#   POPCAST_HOME (/opt/popcast: the checkout, commands run there), POPCAST_VENV ($POPCAST_HOME/.venv),
#   POPCAST_CATALOG (/data/catalog: one dt=YYYY-MM-DD/ folder per day), POPCAST_FEATURES (/data/features),
#   POPCAST_MODEL (/data/model), POPCAST_SCORED (/data/scored), POPCAST_PROFILE (spark),
#   POPCAST_BEAM_FLAGS (extra Beam flags, split on spaces), POPCAST_RUN_AT_UTC (02:30),
#   POPCAST_LOCK (/tmp/popcast-nightly.lock: one run at a time), POPCAST_NOW (the time to act as at, any
#   `date -d` string; for tests).
set -euo pipefail

home=${POPCAST_HOME:-/opt/popcast}
venv=${POPCAST_VENV:-$home/.venv}
run_at=${POPCAST_RUN_AT_UTC:-02:30}
now=$(date -u -d "${POPCAST_NOW:-now}" +%s)

if [ $# -gt 1 ] || [[ ${1:-} == -* ]]; then
    echo "usage: nightly.sh [YYYY-MM-DD]" >&2
    echo "  without a day: yesterday in UTC, and only in the quarter hour from $run_at UTC" >&2
    exit 2
elif [ $# -eq 1 ]; then
    day=$1
    if [[ ! $day =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}$ ]] \
            || [ "$(date -u -d "$day" +%F 2>/dev/null)" != "$day" ]; then
        echo "nightly.sh: $day is not a date YYYY-MM-DD" >&2
        exit 2
    fi
else
    minute_now=$(( 10#$(date -u -d "@$now" +%H) * 60 + 10#$(date -u -d "@$now" +%M) ))
    minute_run=$(( 10#${run_at%%:*} * 60 + 10#${run_at##*:} ))
    if [ "$minute_now" -lt "$minute_run" ] || [ "$minute_now" -ge $((minute_run + 15)) ]; then
        exit 0      # not this quarter hour (UTC)
    fi
    day=$(date -u -d "@$((now - 86400))" +%F)      # yesterday in UTC
fi

lock=${POPCAST_LOCK:-/tmp/popcast-nightly.lock}
exec 9>"$lock"
if ! flock -n 9; then
    echo "$(date -u +%FT%TZ) nightly.sh: another run holds the lock $lock; not starting dt=$day" >&2
    exit 1
fi

catalog=${POPCAST_CATALOG:-/data/catalog}
features=${POPCAST_FEATURES:-/data/features}
profile=${POPCAST_PROFILE:-spark}
stamp=$(date -u -d "@$now" +%Y%m%dT%H%M%S)
read -r -a beam_flags <<< "${POPCAST_BEAM_FLAGS:-}"
cd "$home"
echo "$(date -u +%FT%TZ) nightly.sh: featurize dt=$day"
"$venv/bin/popcast" featurize --catalog "$catalog/dt=$day/" --output "$features" \
    --run-id "featurize-${day//-/}-$stamp" --profile "$profile" "${beam_flags[@]}"
echo "$(date -u +%FT%TZ) nightly.sh: score dt=$day"
"$venv/bin/popcast" score --catalog "$catalog/dt=$day/" --features "$features" \
    --model "${POPCAST_MODEL:-/data/model}" --output "${POPCAST_SCORED:-/data/scored}" --date "$day" \
    --run-id "score-${day//-/}-$stamp" --profile "$profile" "${beam_flags[@]}"
echo "$(date -u +%FT%TZ) nightly.sh: done dt=$day"
