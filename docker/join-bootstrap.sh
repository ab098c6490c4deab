#!/bin/sh
# Entrypoint of the compose `peer` service. Arguments are passed on to `legion-swarm join`.
#  - LEGION_BOOTSTRAP set (whitespace-separated full multiaddrs): join through those peers, e.g. a
#    public swarm. The local `bootstrap` service is not needed (start peers with --no-deps).
#  - otherwise: wait for the address the `bootstrap` service wrote to $LEGION_ADDR_FILE and use it.
set -eu

addr_file=${LEGION_ADDR_FILE:-/shared/bootstrap.maddr}
wait_s=${LEGION_WAIT_SECONDS:-120}

if [ -n "${LEGION_BOOTSTRAP:-}" ]; then
    set -f # split on whitespace, never glob
    for maddr in $LEGION_BOOTSTRAP; do
        set -- --peer "$maddr" "$@"
    done
    set +f
else
    waited=0
    while [ ! -s "$addr_file" ]; do
        if [ "$waited" -ge "$wait_s" ]; then
            echo "join-bootstrap: no address in $addr_file after ${wait_s}s;" \
                "is the bootstrap service up? (or set LEGION_BOOTSTRAP)" >&2
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    maddr=
    IFS= read -r maddr <"$addr_file" || true
    set -- --peer "$maddr" "$@"
fi

exec legion-swarm join "$@"
