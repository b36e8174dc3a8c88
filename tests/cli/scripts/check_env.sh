#!/usr/bin/env bash
# A torchrun user script in bash (run with --no-python): checks a few torchrun variables, touches $1/$RANK.
set -eu
: "${RANK:?}" "${LOCAL_RANK:?}" "${WORLD_SIZE:?}" "${LOCAL_WORLD_SIZE:?}" "${MASTER_ADDR:?}" "${MASTER_PORT:?}"
: "${TORCHELASTIC_RUN_ID:?}" "${TORCHELASTIC_RESTART_COUNT:?}" "${LAUNCHER_TEST_SENTINEL:?}"
[ "$RANK" -lt "$WORLD_SIZE" ] || { echo "RANK=$RANK >= WORLD_SIZE=$WORLD_SIZE" >&2; exit 3; }
touch "$1/$RANK"
echo "rank $RANK touched $1/$RANK"
